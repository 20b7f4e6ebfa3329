#!/usr/bin/env bash
# Installs the peer, open-mythos==0.5.0 from PyPI, into its own virtualenv, so that it never
# shares an environment with this package (its metadata pins torch==2.11 and pulls in datasets).
# Used by `python benchmarks/speed.py --vs-open-mythos`.
#
#   bash benchmarks/setup_open_mythos.sh            # creates benchmarks/.venv-open-mythos
#   OPEN_MYTHOS_WHEEL=/path/to/open_mythos-0.5.0-py3-none-any.whl bash benchmarks/setup_open_mythos.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${OPEN_MYTHOS_VENV:-$here/.venv-open-mythos}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
pip="$venv/bin/pip"
# the same torch as ours (the CPU wheel where pip finds one), so both run on the same kernels
"$pip" install --quiet "torch==$("$python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)"
# --no-deps: the peer's metadata pulls in training-only packages; its import needs transformers
"$pip" install --quiet --no-deps "${OPEN_MYTHOS_WHEEL:-open-mythos==0.5.0}"
"$pip" install --quiet transformers
"$venv/bin/python" -c "import open_mythos, torch; print('open-mythos ready in', '$venv', 'torch', torch.__version__)"
