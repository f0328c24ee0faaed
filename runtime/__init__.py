"""State that outlives one call: the per-(sequence, site) KV store and the registry that maps the
model's cache tensors to it."""

from kvpass.runtime.lsh import LSHIndex
from kvpass.runtime.registry import REGISTRY, Registry
from kvpass.runtime.store import HostKV, KVStore

__all__ = ["REGISTRY", "HostKV", "KVStore", "LSHIndex", "Registry"]
