"""KV state that outlives one call: per (sequence, attention site) a static part on the model's device
(S sink slots + a W-slot window ring) and the rest of the tokens in host memory, each token stored once.

Shapes: B batch, Hkv kv heads, D head_dim, S sink_size, W window_size.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys

import torch
from kvpass.cpu_ops import ESTIMATOR_IDS, host_attention, lsh_attention
from kvpass.runtime.lsh import LSHIndex

_MADV_HUGEPAGE = 14
_HUGE = 2 << 20


def _huge_pages(t: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages under a fresh (untouched) host tensor.  Retrieval reads
    scattered rows of a large store: with 4 KiB pages nearly every row is a TLB miss, which costs more
    than the row itself.  Best effort: a no-op where madvise or THP is unavailable."""
    if t.nbytes < 2 * _HUGE or not sys.platform.startswith("linux"):
        return
    start = (t.data_ptr() + _HUGE - 1) // _HUGE * _HUGE
    end = (t.data_ptr() + t.nbytes) // _HUGE * _HUGE
    if end > start:
        try:
            _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
        except (OSError, AttributeError):
            pass


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


class HostKV:
    """Append-only host store of K and V, in fixed-size blocks: growing never copies what is stored.

    Block i holds tokens [i*block_size, (i+1)*block_size) of the offloaded sequence as
    k, v: [B, Hkv, block_size, D] views (token stride 2·D: K and V of a token are adjacent in one
    [B, Hkv, block_size, 2, D] allocation; pinned when the model runs on an accelerator).
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 block_size: int = 4096, pin: bool = False):
        self.shape = (batch, num_kv_heads, block_size, head_dim)
        self.dtype, self.block_size, self.pin = dtype, block_size, pin
        self.k_blocks: list[torch.Tensor] = []
        self.v_blocks: list[torch.Tensor] = []
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [B, Hkv, T, D] on any device; copied to host memory in the store's dtype."""
        t0, T = 0, k.shape[2]
        while t0 < T:
            used = self.length % self.block_size
            if used == 0 and self.length // self.block_size == len(self.k_blocks):
                # K and V of a token side by side ([B, Hkv, block, 2, D]): the CPU reads a retrieved
                # token's K and V as one contiguous 2·D row (one DRAM page, adjacent-line prefetch)
                b, h, n, d = self.shape
                kv = torch.empty(b, h, n, 2, d, dtype=self.dtype, pin_memory=self.pin)
                if not self.pin:
                    _huge_pages(kv)
                self.k_blocks.append(kv[:, :, :, 0])
                self.v_blocks.append(kv[:, :, :, 1])
            n = min(self.block_size - used, T - t0)
            blk = self.length // self.block_size
            self.k_blocks[blk][:, :, used:used + n].copy_(k[:, :, t0:t0 + n])
            self.v_blocks[blk][:, :, used:used + n].copy_(v[:, :, t0:t0 + n])
            self.length += n
            t0 += n

    def views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The stored tokens as per-block views [B, Hkv, n_i, D] (no copies), in position order."""
        ks, vs, left = [], [], self.length
        for kb, vb in zip(self.k_blocks, self.v_blocks):
            n = min(left, self.block_size)
            if n == 0:
                break
            ks.append(kb[:, :, :n])
            vs.append(vb[:, :, :n])
            left -= n
        return ks, vs

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tokens (one copy of K and V each)."""
        b, h, _, d = self.shape
        return 2 * self.length * b * h * d * self.dtype.itemsize

    @property
    def reserved_bytes(self) -> int:
        return sum(t.nbytes for t in self.k_blocks) + sum(t.nbytes for t in self.v_blocks)


class KVStore:
    """The KV of one sequence batch at one attention site: static part on the device, the rest on the
    host with a SimHash index.  Usable without the compiler (serving-engine integration):

        store = KVStore(num_kv_heads=8, head_dim=128, sink_size=4, window_size=64, dtype=torch.bfloat16)
        store.append(k, v)                              # k, v: [B, Hkv, T, D]
        out = store.attend(q, estimator="sample")       # q: [B, H, Tq, D], the newest Tq tokens' queries

    (``attend``, which also runs the static part and the merge, is added by ``kvpass.KVStore``; this
    room only holds state and the CPU half.)

    Token at absolute position p lives in exactly one place:
      p < S                      → sink slot p                      (device)
      p >= max(S, length - W)    → ring slot S + (p - S) % W        (device)
      otherwise                  → host store, index p - S          (host; indexed by LSH)
    static_k/static_v: [B, Hkv, S+W, D]; static_pos: [S+W] int64 (-1 = empty slot).
    The batch size is taken from the first append (or ``batch=``).
    """

    def __init__(self, num_kv_heads: int, head_dim: int, *, sink_size: int = 4, window_size: int = 64,
                 lsh_k: int = 10, lsh_l: int = 150, lsh_threshold: int = 2, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 host_block_size: int = 4096, batch: int | None = None, site: str = "kvstore",
                 budget: float = 0.02, static_backend: str = "auto"):
        if window_size < 1:
            raise ValueError(f"kvpass: window_size must be >= 1, got {window_size}")
        if sink_size < 0:
            raise ValueError(f"kvpass: sink_size must be >= 0, got {sink_size}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"kvpass: KV dtype {dtype} is not supported (float32, bfloat16, float16)")
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.sink_size, self.window_size = sink_size, window_size
        self.lsh = {"lsh_k": lsh_k, "lsh_l": lsh_l, "threshold": lsh_threshold, "seed": seed}
        LSHIndex(1, 1, 1, **self.lsh)  # validate the LSH knobs now, not at the first offload
        self.host_block_size, self.budget = host_block_size, budget
        self.static_backend = static_backend  # "auto" | "triton" | "torch" (the static part's kernel)
        self.site = site         # the attention site this store serves
        self.buffer = None       # weakref to the model's static cache buffer, when there is one
        self.handle: torch.Tensor | None = None  # the registry's current handle
        self.masked_steps = 0    # decode steps whose mask was not plain causal (applied exactly, slower)
        self.last_keys_read = 0.0  # mean keys scored per query row at the last host attention
        self.last_query_codes: torch.Tensor | None = None  # [B, H, Tq, L] the kernel's, at the last call
        self.batch = 0
        self.reset()
        if batch is not None:
            self._allocate(batch)

    def reset(self) -> None:
        """Forget every token (a new sequence); keeps the configuration."""
        self.length = 0
        self.last_positions = torch.empty(0, dtype=torch.long, device=self.device)
        self.masked_steps, self.last_keys_read = 0, 0.0
        if self.batch:
            self._allocate(self.batch)

    def _allocate(self, batch: int) -> None:
        S, W, Hkv, D = self.sink_size, self.window_size, self.num_kv_heads, self.head_dim
        self.batch = batch
        self.static_k = torch.zeros(batch, Hkv, S + W, D, dtype=self.dtype, device=self.device)
        self.static_v = torch.zeros_like(self.static_k)
        self.static_pos = torch.full((S + W,), -1, dtype=torch.long, device=self.device)
        self.host = HostKV(batch, Hkv, D, self.dtype, self.host_block_size, pin=self.device.type == "cuda")
        self.index = LSHIndex(batch, Hkv, D, site=self.site, **self.lsh)

    def _ring_slot(self, p: int) -> int:
        return self.sink_size + (p - self.sink_size) % self.window_size

    def _to_host(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.host.append(k, v)
        self.index.add(k, lambda: torch.cat(self.host.views()[0], 2))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append T tokens at positions [length, length+T).  k, v: [B, Hkv, T, D]."""
        if not self.batch:
            self._allocate(k.shape[0])
        S, W, L, T = self.sink_size, self.window_size, self.length, k.shape[2]
        if tuple(k.shape) != (self.batch, self.num_kv_heads, T, self.head_dim) or k.shape != v.shape:
            raise ValueError(f"kvpass: append of k {tuple(k.shape)} / v {tuple(v.shape)} to a store of "
                             f"[B={self.batch}, Hkv={self.num_kv_heads}, T, D={self.head_dim}]")
        k, v = k.to(self.device, self.dtype), v.to(self.device, self.dtype)
        end = L + T
        # sinks
        n_sink = max(0, min(S, end) - L)
        if n_sink:
            self.static_k[:, :, L:L + n_sink] = k[:, :, :n_sink]
            self.static_v[:, :, L:L + n_sink] = v[:, :, :n_sink]
            self.static_pos[L:L + n_sink] = torch.arange(L, L + n_sink, device=self.device)
        # tokens at positions [host_from, host_to) leave (or skip) the window for the host store
        host_from, host_to = max(S, L - W), max(S, end - W)
        old_to = min(host_to, L)  # part still in the ring
        if old_to > host_from:
            slots = torch.tensor([self._ring_slot(p) for p in range(host_from, old_to)], device=self.device)
            self._to_host(self.static_k.index_select(2, slots), self.static_v.index_select(2, slots))
        new_from = max(host_from, L)
        if host_to > new_from:
            self._to_host(k[:, :, new_from - L:host_to - L], v[:, :, new_from - L:host_to - L])
        # the newest tokens enter the ring
        ring_from = max(S, L, host_to)
        if end > ring_from:
            positions = list(range(ring_from, end))
            slots = torch.tensor([self._ring_slot(p) for p in positions], device=self.device)
            src = torch.arange(ring_from - L, end - L, device=self.device)
            self.static_k.index_copy_(2, slots, k.index_select(2, src))
            self.static_v.index_copy_(2, slots, v.index_select(2, src))
            self.static_pos.index_copy_(0, slots, torch.tensor(positions, device=self.device))
        self.length = end
        self.last_positions = torch.arange(L, end, device=self.device)

    # ------------------------------------------------------------ attention

    def resolve_budget(self, budget: float | None) -> int:
        """Keys kept by topk/oracle: an int is a count, a float in (0, 1] a fraction of the host keys."""
        budget = self.budget if budget is None else budget
        n = self.host.length if self.batch else 0
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
            raise ValueError(f"kvpass: budget must be a positive token count or a fraction in (0, 1], got "
                             f"{budget!r}")
        if isinstance(budget, float):
            if budget > 1:
                raise ValueError(f"kvpass: a float budget is a fraction in (0, 1], got {budget}; pass an int "
                                 f"for a token count")
            return max(1, round(budget * n))
        return min(budget, n)

    def attend_host(self, q: torch.Tensor, *, estimator: str = "sample", budget: float | None = None,
                    scale: float | None = None, with_static: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q [B, H, Tq, D] over the host tokens, computed by the CPU.  Returns out
        [B, H, Tq, D] fp32 and lse [B, H, Tq] fp32 on q's device (lse = -inf where nothing is there).

        with_static (a CPU store only): the static part (sinks + window, causal for the newest Tq tokens)
        is attended exactly in the same pass, so out/lse are the whole attention — no merge needed."""
        scale = 1.0 / math.sqrt(self.head_dim) if scale is None else scale
        qh = q.detach().to("cpu", torch.float32)
        n, idx = self.host.length, self.index
        if estimator not in ESTIMATOR_IDS and estimator != "exact":
            raise ValueError(f"kvpass: unknown estimator {estimator!r}; expected one of "
                             f"['sample', 'topk', 'oracle', 'exact', 'none']")
        static = {}
        if with_static:
            q_pos = torch.arange(self.length - q.shape[2], self.length)
            allowed = (self.static_pos >= 0)[None, :] & (self.static_pos[None, :] <= q_pos[:, None])
            static = {"static_k": self.static_k, "static_v": self.static_v, "static_allowed": allowed}
        if estimator == "exact" and not with_static:
            out, lse = host_attention(qh, *self.host.views(), scale)
            self.last_keys_read = float(n)
            return out.to(q.device), lse.to(q.device)
        budget_n = self.resolve_budget(budget) if n else 0
        if estimator == "exact" or (estimator == "sample" and not idx.built):
            estimator, budget_n = "oracle", n  # every key (below min_keys, sampling reads them all)
        elif estimator == "topk" and not idx.built:
            estimator = "oracle"  # too few keys for an index: the best `budget` of all of them
        mu = idx.mu if idx.built else torch.zeros(self.batch, self.num_kv_heads, self.head_dim)
        meta = torch.tensor(idx.seg_meta, dtype=torch.long).reshape(-1, 2)
        out, lse, n_read, self.last_query_codes = lsh_attention(
            qh, idx.proj("cpu"), mu, self.host.k_blocks, self.host.v_blocks, self.host_block_size, n, idx.seg_ids,
            idx.seg_starts, meta, idx.tail, idx.tail_base, idx.tail_len, lsh_k=idx.lsh_k, threshold=idx.threshold,
            estimator=estimator, budget=budget_n, scale=scale, **static)
        self.last_keys_read = float(n_read.float().mean())
        return out.to(q.device), lse.to(q.device)

    # ------------------------------------------------------------ accounting

    def stats(self) -> dict[str, float]:
        """Bytes and tokens: device (sinks + window) and host KV, index, projection; keys read."""
        n = self.host.length if self.batch else 0
        return {
            "tokens": self.length,
            "tokens_offloaded": n,
            "device_kv_bytes": self.device_bytes,
            "host_kv_bytes": self.host_bytes,
            "index_bytes": self.index_bytes,
            "projection_bytes": self.index.projection_bytes if self.batch else 0,
            "keys_read_last": self.last_keys_read,
            "keys_read_fraction_last": self.last_keys_read / n if n else 0.0,
        }

    @property
    def device_bytes(self) -> int:
        return self.static_k.nbytes + self.static_v.nbytes if self.batch else 0

    @property
    def host_bytes(self) -> int:
        return self.host.nbytes if self.batch else 0

    @property
    def index_bytes(self) -> int:
        return self.index.index_bytes if self.batch else 0

    @property
    def tokens_offloaded(self) -> int:
        return self.host.length if self.batch else 0
