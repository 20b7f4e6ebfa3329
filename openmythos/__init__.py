"""OpenMythos: Recurrent-Depth Transformer language models in PyTorch.

The names below load on first use, so that `import openmythos.cli` can configure OpenMP before
torch is imported."""

from __future__ import annotations

import importlib

_EXPORTS = {"MythosConfig": "openmythos.config", "KVCache": "openmythos.model",
            "MythosOutput": "openmythos.model", "OpenMythos": "openmythos.model"}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'openmythos' has no attribute {name!r}")
