"""Which store belongs to which cache tensor.

kvpass owns the KV of every rewritten site.  The model's own cache keeps, in place of K and V, a
*placeholder*: a stride-0 expand of a tiny NaN "handle" tensor, with the shape the model expects (so
its position bookkeeping, `get_seq_length()`, masks and `generate()` work unchanged) and a few bytes of
storage.  The handle's address names the store; a placeholder whose storage nothing but the registry
holds any more belongs to a dropped sequence, and its store is freed.  Static caches (preallocated
buffers the model owns) are named by the buffer's address instead.

Beam search reorders the model's cache by copying batch rows (``index_select``), which turns placeholders
into plain NaN tensors with no link to their store.  So each handle row also carries a *tag* in its NaN
payloads (the mantissa bits a NaN ignores; a copy keeps them): a magic number, the store's serial number
and the row.  The first elements of the copied row say which store and which of its rows it came from,
and the store follows (``KVStore.reorder``).  A conversion that drops payloads (a dtype cast) leaves
untagged NaN, which kvpass refuses with an error, never adopts as KV.
"""

from __future__ import annotations

import itertools
import threading
import weakref

import torch
from kvpass.runtime.store import KVStore


def _storage_refs(t: torch.Tensor) -> int:
    """References to t's storage: t itself, every view of it — and the temporary storage object this
    call makes (so a tensor with no views reports 2, hence the baseline recorded per handle)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


TAG_MAGIC = 0x4B56  # "KV"; < 2^15: the word is a signed int64
TAG_NIBBLES = 16  # 64 bits, 4 per element: magic (16) | store serial (32) | row (16)
# a quiet NaN of each dtype, as its integer bits; an element of a tag is NAN | nibble
_QNAN = {torch.float32: (torch.int32, 0x7FC00000), torch.bfloat16: (torch.int16, 0x7FC0),
         torch.float16: (torch.int16, 0x7E00)}
_SHIFTS = torch.arange(TAG_NIBBLES - 1, -1, -1) * 4  # nibble i of a tag word sits at bits _SHIFTS[i]


def _tag_words(serial: int, batch: int) -> torch.Tensor:
    """[batch, TAG_NIBBLES] int64: the nibbles of each row's tag, most significant first."""
    words = [(TAG_MAGIC << 48) | ((serial & 0xFFFFFFFF) << 16) | b for b in range(batch)]
    return (torch.tensor(words, dtype=torch.int64)[:, None] >> _SHIFTS) & 0xF


def write_tags(h: torch.Tensor, serial: int) -> None:
    """Tag the rows of a fresh handle h [B, Hkv, 1, D] (no-op where its dtype or size cannot carry a tag)."""
    if h.dtype not in _QNAN or h[0].numel() < TAG_NIBBLES or h.shape[0] > 0xFFFF:
        return
    int_dtype, nan = _QNAN[h.dtype]
    flat = h.view(int_dtype).view(h.shape[0], -1)
    flat[:, :TAG_NIBBLES] = (_tag_words(serial, h.shape[0]) | nan).to(int_dtype).to(h.device)


def read_tags(t: torch.Tensor) -> tuple[int, torch.Tensor] | None:
    """(store serial, rows [B] int64) when every batch row of a cache tensor t [B, Hkv, L, D] begins with
    a kvpass tag of one store; else None."""
    if t.dim() != 4 or t.dtype not in _QNAN or t.shape[2] == 0 or t[0, :, 0].numel() < TAG_NIBBLES:
        return None
    int_dtype, nan = _QNAN[t.dtype]
    head = t[:, :, 0].reshape(t.shape[0], -1)[:, :TAG_NIBBLES].cpu().contiguous().view(int_dtype).long()
    if not bool(((head & ~0xF) == nan).all()):
        return None
    words = ((head & 0xF) << _SHIFTS).sum(1)
    magic, serial, rows = words >> 48, (words >> 16) & 0xFFFFFFFF, words & 0xFFFF
    if not bool((magic == TAG_MAGIC).all()) or not bool((serial == serial[0]).all()):
        return None
    return int(serial[0]), rows


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_handle: dict[int, KVStore] = {}
        self._by_buffer: dict[tuple[str, int], tuple[weakref.ref, KVStore]] = {}
        self.after_collect = 0  # reserved_bytes() after the last cycle collection kvpass asked for
        self.collect_pending = False  # a graph was compiled since: collect at the next sequence start
        self.peak_device_kv = 0  # the most KV bytes on the model's device seen at an append (note_device_kv)
        self._serials = itertools.count(1)

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
            if getattr(store, "serial", None) is None:
                store.serial = next(self._serials)
            write_tags(h, store.serial)
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

    def by_tags(self, t: torch.Tensor) -> tuple[KVStore, torch.Tensor] | None:
        """(store, rows) when t is a row-wise copy of a live store's placeholder (``read_tags``)."""
        tags = read_tags(t)
        if tags is None:
            return None
        with self._lock:
            store = next((s for s in self._by_handle.values() if s.serial == tags[0]), None)
        return None if store is None else (store, tags[1])

    def by_buffer(self, site: str, buf: torch.Tensor) -> KVStore | None:
        with self._lock:
            entry = self._by_buffer.get((site, buf.data_ptr()))
        if entry is None or entry[0]() is None:
            return None
        return entry[1]

    def bind_buffer(self, site: str, buf: torch.Tensor, store: KVStore) -> None:
        store.buffer = weakref.ref(buf)
        store.model_buffer_bytes = 2 * buf.nbytes  # the model's K and V buffers
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

    def note_device_kv(self, block_bytes: int) -> None:
        """At an append: the model's device holds every live store's static slots (and a static cache's
        own buffers, which the model keeps) plus the block being appended (the layer's own K/V for it,
        alive while the layer runs; a growing cache keeps placeholders).  Keeps the peak of that sum
        (``runtime_stats()["peak_device_kv_bytes"]``)."""
        with self._lock:
            now = block_bytes + sum(s.device_bytes + s.model_buffer_bytes for s in self._by_handle.values() if s.batch)
            self.peak_device_kv = max(self.peak_device_kv, now)

    def reserved_bytes(self) -> int:
        """Host bytes reserved by every registered store (live, or finished and not yet swept)."""
        with self._lock:
            stores = list(self._by_handle.values())
        return sum(s.host.reserved_bytes + s.index_bytes for s in stores if s.batch)

    def release(self, tensors) -> int:
        """Drop the stores that ``tensors`` name — placeholders (by their handle; row copies of them, after a
        beam reorder, by their tags) or static cache buffers — and return how many were dropped.  Anything
        else is ignored."""
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        ptrs = {t.data_ptr() for t in tensors}
        serials = {tags[0] for t in tensors if (tags := read_tags(t)) is not None}  # reordered copies
        with self._lock:
            doomed = [s for p, s in self._by_handle.items() if p in ptrs or s.serial in serials]
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
            self.peak_device_kv = 0
            self._by_handle.clear()
            self._by_buffer.clear()


REGISTRY = Registry()
