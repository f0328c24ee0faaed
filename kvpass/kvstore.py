"""``kvpass.KVStore``: the runtime store with the whole split attention, usable without the compiler."""

from __future__ import annotations

import math

import torch

from kvpass.lowering import merge_partials, static_attention
from kvpass.runtime.store import KVStore as _StoreState


class KVStore(_StoreState):
    __doc__ = _StoreState.__doc__

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
