"""Per-layer quality of the estimators on a real model's activations (no compiler involved).

Runs the model once over a long real-text prompt, records each attention layer's q, K and V, and for
the last ``positions`` tokens compares each estimator's attention output with dense attention over the
same keys: cosine similarity and relative L2 error, per layer, averaged over heads and positions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvpass.runtime import KVStore


@dataclass
class LayerQuality:
    layer: int
    cosine: dict[str, float] = field(default_factory=dict)
    rel_error: dict[str, float] = field(default_factory=dict)
    keys_read: dict[str, float] = field(default_factory=dict)  # fraction of the offloaded keys


@contextlib.contextmanager
def record_attention():
    """Records (q, k, v) of every F.scaled_dot_product_attention call, with K/V un-repeated."""
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    orig = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.detach(), k.detach(), v.detach()))
        return orig(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = orig


def _unrepeat(k: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """K as the model repeated it for GQA ([B, H, n, D]) → [B, Hkv, n, D] (no-op if already so)."""
    if k.shape[1] == num_kv_heads:
        return k
    return k[:, :: k.shape[1] // num_kv_heads]


def layer_quality(model, input_ids: torch.Tensor, *, positions: int = 8, estimators=("sample", "topk", "oracle",
                  "none"), **store_options) -> list[LayerQuality]:
    """Quality of each estimator at each attention layer, for the last ``positions`` query tokens.

    topk and oracle get the budget that sample actually read at that layer and position ("same number of
    keys").  store_options: KVStore knobs (sink_size, window_size, lsh_k, lsh_l, lsh_threshold, seed); the
    store keeps the LSH index (topk: the best of sample's candidates, as MagicPIG compares them).
    """
    store_options = {"retriever": "lsh", **store_options}
    cfg = model.config
    num_kv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    with record_attention() as calls, torch.no_grad():
        model(input_ids)
    results = []
    n_total = input_ids.shape[1]
    for layer, (q, k, v) in enumerate(calls):
        k, v = _unrepeat(k, num_kv), _unrepeat(v, num_kv)
        res = LayerQuality(layer)
        sums: dict[str, list[float]] = {e: [0.0, 0.0, 0.0] for e in estimators}
        store = KVStore(num_kv, k.shape[-1], dtype=k.dtype, batch=k.shape[0], **store_options)
        start = n_total - positions
        store.append(k[:, :, :start], v[:, :, :start])
        for p in range(start, n_total):
            store.append(k[:, :, p:p + 1], v[:, :, p:p + 1])
            qp = q[:, :, p:p + 1]
            dense = F.scaled_dot_product_attention(qp, k[:, :, :p + 1], v[:, :, :p + 1], enable_gqa=True)
            budget = None
            for est in estimators:
                kw = {}
                if est in ("topk", "oracle"):
                    kw["budget"] = max(1, round(budget)) if budget is not None else None
                out = store.attend(qp, estimator=est, **kw)
                if est == "sample":
                    budget = store.last_keys_read
                cos = F.cosine_similarity(out.flatten(2), dense.flatten(2), dim=-1).mean().item()
                rel = ((out - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-12)).mean().item()
                read = 0.0 if est == "none" else store.last_keys_read / max(store.tokens_offloaded, 1)
                for i, x in enumerate((cos, rel, read)):
                    sums[est][i] += x / positions
        for est, (cos, rel, read) in sums.items():
            res.cosine[est], res.rel_error[est], res.keys_read[est] = cos, rel, read
        results.append(res)
    return results


def format_quality(rows: list[LayerQuality]) -> str:
    ests = list(rows[0].cosine)
    head = "layer | " + " | ".join(f"{e} cos / rel.err" for e in ests) + " | sample keys read"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = " | ".join(f"{r.cosine[e]:.4f} / {r.rel_error[e]:.3f}" for e in ests)
        lines.append(f"{r.layer:5d} | {cells} | {r.keys_read.get('sample', 0):.2%}")
    mean = {e: sum(r.cosine[e] for r in rows) / len(rows) for e in ests}
    merr = {e: sum(r.rel_error[e] for r in rows) / len(rows) for e in ests}
    lines.append(" mean | " + " | ".join(f"{mean[e]:.4f} / {merr[e]:.3f}" for e in ests))
    return "\n".join(lines)
