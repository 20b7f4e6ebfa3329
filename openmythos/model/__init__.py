from openmythos.model.cache import KVCache
from openmythos.model.model import MythosOutput, OpenMythos

__all__ = ["KVCache", "MythosOutput", "OpenMythos"]
