from openmythos.model.cache import KVCache
from openmythos.model.model import IGNORE_INDEX, MythosOutput, OpenMythos

__all__ = ["IGNORE_INDEX", "KVCache", "MythosOutput", "OpenMythos"]
