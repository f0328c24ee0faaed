"""KV state that outlives one call: per (sequence, attention site) a static part on the model's device
(S sink slots + a W-slot window ring) and the rest of the tokens in host memory, each token stored once.

Shapes: B batch, Hkv kv heads, D head_dim, S sink_size, W window_size.
"""

from __future__ import annotations

import torch


class HostKV:
    """Append-only host store of K and V, in fixed-size blocks: growing never copies what is stored.

    Block i holds tokens [i*block_size, (i+1)*block_size) of the offloaded sequence as
    k, v: [B, Hkv, block_size, D] (pinned when the model runs on an accelerator, for async copies).
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
                self.k_blocks.append(torch.empty(self.shape, dtype=self.dtype, pin_memory=self.pin))
                self.v_blocks.append(torch.empty(self.shape, dtype=self.dtype, pin_memory=self.pin))
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


class LayerKV:
    """The KV of one sequence at one attention site.

    Token at absolute position p lives in exactly one place:
      p < S                      → sink slot p                      (device)
      p >= max(S, length - W)    → ring slot S + (p - S) % W        (device)
      otherwise                  → host store, index p - S          (host)
    static_k/static_v: [B, Hkv, S+W, D]; static_pos: [S+W] int64 (-1 = empty slot).
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device, sink_size: int, window_size: int, host_block_size: int = 4096):
        if window_size < 1:
            raise ValueError(f"kvpass: window_size must be >= 1, got {window_size}")
        S, W = sink_size, window_size
        self.batch, self.num_kv_heads, self.head_dim = batch, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.sink_size, self.window_size = S, W
        self.static_k = torch.zeros(batch, num_kv_heads, S + W, head_dim, dtype=dtype, device=device)
        self.static_v = torch.zeros_like(self.static_k)
        self.static_pos = torch.full((S + W,), -1, dtype=torch.long, device=device)
        self.host = HostKV(batch, num_kv_heads, head_dim, dtype, host_block_size,
                           pin=self.device.type == "cuda")
        self.site = ""           # the attention site this store serves (set by the caller)
        self.buffer = None       # weakref to the model's static cache buffer, when there is one
        self.handle: torch.Tensor | None = None  # the registry's current handle
        self.length = 0          # tokens appended so far
        self.masked_steps = 0    # decode steps whose mask was not plain causal (applied exactly, slower)
        self.last_positions = torch.empty(0, dtype=torch.long, device=device)  # of the last append

    def _ring_slot(self, p: int) -> int:
        return self.sink_size + (p - self.sink_size) % self.window_size

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append T tokens at positions [length, length+T).  k, v: [B, Hkv, T, D]."""
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
            self.host.append(self.static_k.index_select(2, slots), self.static_v.index_select(2, slots))
        new_from = max(host_from, L)
        if host_to > new_from:
            self.host.append(k[:, :, new_from - L:host_to - L], v[:, :, new_from - L:host_to - L])
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

    @property
    def device_bytes(self) -> int:
        return self.static_k.nbytes + self.static_v.nbytes

    @property
    def host_bytes(self) -> int:
        return self.host.nbytes

    @property
    def tokens_offloaded(self) -> int:
        return self.host.length
