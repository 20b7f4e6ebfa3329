"""OpenMythos: Recurrent-Depth Transformer language models in PyTorch."""

from openmythos.config import MythosConfig
from openmythos.model import KVCache, MythosOutput, OpenMythos

__all__ = ["KVCache", "MythosConfig", "MythosOutput", "OpenMythos"]
__version__ = "0.1.0"
