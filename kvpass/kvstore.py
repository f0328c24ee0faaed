"""``kvpass.KVStore``: the runtime store with the whole split attention, usable without the compiler."""

from __future__ import annotations

import math

import torch

from kvpass.lowering import merge_partials, static_attention
from kvpass.runtime.store import KVStore as _StoreState


class KVStore(_StoreState):
    __doc__ = _StoreState.__doc__

    def __init__(self, *args, overlap: bool = True, **kwargs):
        """overlap (a store on CUDA): the CPU part runs while the device computes the static part, with
        q and the CPU partial moving through pinned buffers on a copy stream (``attend_overlapped``);
        False: one after the other.  Other arguments: see the class docstring."""
        super().__init__(*args, **kwargs)
        self.overlap = overlap

    def attend(self, q: torch.Tensor, *, estimator: str = "sample", budget: float | None = None,
               scale: float | None = None) -> torch.Tensor:
        """Attention of the newest Tq tokens' queries q [B, H, Tq, D] over every stored token (causal
        inside the block): static part on the device + host part by the CPU, merged exactly by LSE.
        estimator: "sample" | "topk" | "oracle" | "exact" | "none" (static part only).  Returns
        [B, H, Tq, D] in q's dtype."""
        if q.shape[2] > self.length:
            raise ValueError(f"kvpass: {q.shape[2]} queries but only {self.length} tokens stored")
        scale = 1.0 / math.sqrt(self.head_dim) if scale is None else scale
        backend = static_backend(self)
        if self.device.type == "cpu" and estimator != "none" and backend == "torch":
            # one fused CPU pass over the static slots and the host keys, no merge
            out, _ = self.attend_host(q, estimator=estimator, budget=budget, scale=scale, with_static=True)
            return out.to(q.device, q.dtype)
        if self.device.type == "cuda" and estimator != "none" and self.overlap:
            return attend_overlapped(self, q, _CUDA, estimator=estimator, budget=budget, scale=scale,
                                     backend=backend)
        q_pos = torch.arange(self.length - q.shape[2], self.length, device=self.device)
        if backend == "triton":  # one device pass: static part + merge of the CPU partial
            from kvpass.lowering.triton_static import static_attention_triton

            o_d = l_d = None
            if estimator != "none":
                o_d, l_d = self.attend_host(q, estimator=estimator, budget=budget, scale=scale)
            out, _ = static_attention_triton(q.to(self.device), self.static_k, self.static_v, self.static_pos,
                                             q_pos, scale, o_d, l_d)
            return out.to(q.device, q.dtype)
        out_s, lse_s = static_attention(q.to(self.device), self.static_k, self.static_v, self.static_pos, q_pos,
                                        scale)
        if estimator == "none":
            return out_s.to(q.device, q.dtype)
        out_d, lse_d = self.attend_host(q, estimator=estimator, budget=budget, scale=scale)
        out, _ = merge_partials(out_s, lse_s, out_d.to(self.device), lse_d.to(self.device))
        return out.to(q.device, q.dtype)


def static_backend(store: _StoreState) -> str:
    """"triton" or "torch" for this store's device (static_backend "auto": triton on CUDA)."""
    want = store.static_backend
    if want == "torch" or (want == "auto" and store.device.type != "cuda"):
        return "torch"
    try:
        from kvpass.lowering import triton_static
    except ImportError as e:
        if want == "triton":
            raise RuntimeError("kvpass: static_backend='triton' needs the triton package") from e
        return "torch"
    if triton_static.usable(store.device):
        return "triton" if want == "triton" or store.device.type == "cuda" else "torch"
    if want == "triton":
        raise RuntimeError(f"kvpass: static_backend='triton' runs on CUDA devices (or on CPU with "
                           f"TRITON_INTERPRET=1, for tests); this store is on {store.device}")
    return "torch"


# ---------------------------------------------------------------- host <-> device overlap (CUDA)
#
# One decode step of one layer on an accelerator, overlapped:
#
#   main stream  : ...q ready ─┬─ static part (sinks + window) ────────────────┬─ merge → next ops
#   copy stream  :             └─ q → pinned host ─┐         ┌─ (o_d, lse_d) → device ─┘
#   host thread  :                                 └─ CPU kernel (retrieve, score, accumulate)
#
# What overlaps: the device's static part with the q transfer and the CPU kernel, and both transfers
# with whatever the main stream still has queued.  The host thread waits for q alone (an event), not for
# the device to drain.  What cannot: the next layer needs this layer's attention output, so for one
# sequence batch the CPU kernel of layer i + 1 cannot start before the merge of layer i — CPU work runs
# ahead of the device only within a layer.  (Splitting a batch into two halves that alternate between
# device and CPU would overlap across layers; not built.)


class _Streams:
    """What the overlapped step needs from the accelerator runtime (CUDA here; a test substitutes a
    synchronous stand-in to run the same code on a CPU)."""

    pin_memory = True

    def __init__(self):
        self._side: dict = {}

    def current(self, device):
        return torch.cuda.current_stream(device)

    def side(self, device):
        key = str(device)
        if key not in self._side:
            self._side[key] = torch.cuda.Stream(device)
        return self._side[key]

    def use(self, stream):
        return torch.cuda.stream(stream)

    def event(self):
        return torch.cuda.Event()


_CUDA = _Streams()


class _Pinned:
    """A store's page-locked staging buffers for one query block shape: q out, (o_d, lse_d) back."""

    def __init__(self, shape, pin: bool):
        B, H, Tq, D = shape
        self.shape = tuple(shape)
        self.q = torch.empty(B, H, Tq, D, dtype=torch.float32, pin_memory=pin)
        self.out = torch.empty(B, H, Tq, D, dtype=torch.float32, pin_memory=pin)
        self.lse = torch.empty(B, H, Tq, dtype=torch.float32, pin_memory=pin)
        self.free = None  # event: the last results have left self.out / self.lse


def attend_overlapped(store: KVStore, q: torch.Tensor, streams: _Streams, *, estimator: str, budget, scale: float,
                      backend: str) -> torch.Tensor:
    """``KVStore.attend`` for a store on an accelerator, with the CPU part overlapped with the device's
    static part (the diagram above).  Same result as the sequential path up to float rounding (the merge
    runs as a separate step instead of inside the Triton kernel)."""
    dev = store.device
    main, side = streams.current(dev), streams.side(dev)
    pin = getattr(store, "_pinned", None)
    if pin is None or pin.shape != tuple(q.shape):
        pin = store._pinned = _Pinned(q.shape, streams.pin_memory)
    qf = q.detach().float().contiguous()
    # 1. q to the host on the copy stream, as soon as the main stream has produced it
    side.wait_stream(main)
    with streams.use(side):
        pin.q.copy_(qf, non_blocking=True)
        q_there = streams.event()
        q_there.record(side)
    if qf.device.type != "cpu":
        qf.record_stream(side)  # read on the copy stream: not to be reused before that copy is done
    # 2. the static part, queued on the device meanwhile
    q_pos = torch.arange(store.length - q.shape[2], store.length, device=dev)
    if backend == "triton":
        from kvpass.lowering.triton_static import static_attention_triton as static
    else:
        static = static_attention
    out_s, lse_s = static(q.to(dev), store.static_k, store.static_v, store.static_pos, q_pos, scale)
    # 3. the CPU part, once q (only q) has arrived
    q_there.synchronize()
    if pin.free is not None:
        pin.free.synchronize()
    out_d, lse_d = store.attend_host(pin.q, estimator=estimator, budget=budget, scale=scale)
    pin.out.copy_(out_d)
    pin.lse.copy_(lse_d)
    # 4. the results back on the copy stream; the main stream waits for them, then merges
    with streams.use(side):
        o_dev = pin.out.to(dev, non_blocking=True)
        l_dev = pin.lse.to(dev, non_blocking=True)
        pin.free = streams.event()
        pin.free.record(side)
    main.wait_stream(side)
    if o_dev.device.type != "cpu":
        o_dev.record_stream(main)  # allocated on the copy stream, used on the main one
        l_dev.record_stream(main)
    out, _ = merge_partials(out_s, lse_s, o_dev, l_dev)
    return out.to(q.dtype)
