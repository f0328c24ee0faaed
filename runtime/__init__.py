"""State that outlives one call: the typed configuration, the one ``KVStore`` (device/host split, LSH
index, split attention, CUDA overlap) and the registry that maps the model's cache tensors to stores."""

from kvpass.runtime.config import Options, parse_options
from kvpass.runtime.lsh import LSHIndex
from kvpass.runtime.registry import REGISTRY, Registry
from kvpass.runtime.store import HostKV, KVStore

__all__ = ["REGISTRY", "HostKV", "KVStore", "LSHIndex", "Options", "Registry", "parse_options"]
