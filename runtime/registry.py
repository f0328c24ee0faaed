"""Which store belongs to which cache tensor.

kvpass owns the KV of every rewritten site.  The model's own cache keeps, in place of K and V, a
*placeholder*: a stride-0 expand of a tiny NaN "handle" tensor, with the shape the model expects (so
its position bookkeeping, `get_seq_length()`, masks and `generate()` work unchanged) and a few bytes of
storage.  The handle's address names the store; a placeholder whose storage nothing but the registry
holds any more belongs to a dropped sequence, and its store is freed.  Static caches (preallocated
buffers the model owns) are named by the buffer's address instead.
"""

from __future__ import annotations

import threading
import weakref

import torch
from kvpass.runtime.store import KVStore


def _storage_refs(t: torch.Tensor) -> int:
    """References to t's storage: t itself, every view of it — and the temporary storage object this
    call makes (so a tensor with no views reports 2, hence the baseline recorded per handle)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_handle: dict[int, KVStore] = {}
        self._by_buffer: dict[tuple[str, int], tuple[weakref.ref, KVStore]] = {}
        self.after_collect = 0  # reserved_bytes() after the last cycle collection kvpass asked for

    def new_handle(self, store: KVStore) -> torch.Tensor:
        """A fresh handle for `store` (its previous handle is forgotten).  [B, Hkv, 1, D], NaN-filled:
        anything that reads a placeholder's values instead of going through kvpass gets NaN, not a
        plausible wrong number."""
        h = torch.full((store.batch, store.num_kv_heads, 1, store.head_dim), float("nan"),
                       dtype=store.dtype if store.dtype.is_floating_point else torch.float32,
                       device=store.device)
        with self._lock:
            old = getattr(store, "handle", None)
            if old is not None:
                self._by_handle.pop(old.data_ptr(), None)
            store.handle = h
            store.handle_refs = _storage_refs(h)  # the count with no placeholder alive
            self._by_handle[h.data_ptr()] = store
        return h

    def by_handle(self, t: torch.Tensor) -> KVStore | None:
        with self._lock:
            store = self._by_handle.get(t.data_ptr())
        if store is not None and store.handle.data_ptr() != t.data_ptr():
            return None
        return store

    def by_buffer(self, site: str, buf: torch.Tensor) -> KVStore | None:
        with self._lock:
            entry = self._by_buffer.get((site, buf.data_ptr()))
        if entry is None or entry[0]() is None:
            return None
        return entry[1]

    def bind_buffer(self, site: str, buf: torch.Tensor, store: KVStore) -> None:
        store.buffer = weakref.ref(buf)
        with self._lock:
            self._by_buffer[(site, buf.data_ptr())] = (weakref.ref(buf), store)

    def sweep(self, site: str) -> int:
        """Drop the stores of `site` whose cache is gone: a dynamic store whose placeholder nobody holds
        (only the registry's handle refers to its storage), a static store whose buffer was freed.
        Called when `site` starts a new sequence; limited to that site because another site's handle
        may be in flight inside a running graph, before its placeholder exists."""
        with self._lock:
            dead = [p for p, s in self._by_handle.items()
                    if s.site == site and s.buffer is None and _storage_refs(s.handle) <= s.handle_refs]
            for p in dead:
                del self._by_handle[p]
            dead_buf = [key for key, (ref, _) in self._by_buffer.items() if key[0] == site and ref() is None]
            for key in dead_buf:
                store = self._by_buffer.pop(key)[1]
                self._by_handle.pop(store.handle.data_ptr(), None)
        return len(dead) + len(dead_buf)

    def reserved_bytes(self) -> int:
        """Host bytes reserved by every registered store (live, or finished and not yet swept)."""
        with self._lock:
            stores = list(self._by_handle.values())
        return sum(s.host.reserved_bytes + s.index_bytes for s in stores if s.batch)

    def release(self, tensors) -> int:
        """Drop the stores that ``tensors`` name — placeholders (by their handle) or static cache buffers —
        and return how many were dropped.  Anything else is ignored."""
        ptrs = {t.data_ptr() for t in tensors if isinstance(t, torch.Tensor)}
        with self._lock:
            doomed = [s for p, s in self._by_handle.items() if p in ptrs]
            doomed += [s for (_, p), (_, s) in self._by_buffer.items() if p in ptrs and s not in doomed]
            for store in doomed:
                self._by_handle.pop(store.handle.data_ptr(), None)
                for key in [k for k, (_, s) in self._by_buffer.items() if s is store]:
                    del self._by_buffer[key]
        return len(doomed)

    def stores(self) -> list[KVStore]:
        with self._lock:
            return list(self._by_handle.values())

    def clear(self) -> None:
        with self._lock:
            self._by_handle.clear()
            self._by_buffer.clear()


REGISTRY = Registry()
