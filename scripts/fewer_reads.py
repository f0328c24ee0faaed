"""Could a step read less?  Measured on a real model's keys, values and queries.

The defaults rank every offloaded key by its int4 sketch score each step (64 bytes a key per kv head at
head_dim 128) and keep the ``budget`` best.  Three ways to read less, each scored by how many of those
best keys it still finds (recall of the int4 top-``budget``), per layer:

* **exact tile bounds** (Quest-like): per tile of 16 keys, each dimension's min and max code; a tile whose
  upper bound Σ_d max(q_d·min_d, q_d·max_d) is below the m-th best score holds none of the best m and
  could be skipped without changing the answer.  Reported: the fraction of tiles that cannot be skipped.
* **approximate tile selection**: scan only the best 10/20/30% of tiles of 8 or 16 keys, ranked by that
  bound, by the tile's mean code (its centroid) or by both.
* **a coarser prefilter**: rank by a smaller code (sign bits, sign × std, int2) and re-rank the best
  5/10/20% of keys with the int4 sketch.

And of the K/V rows: **V only for the heavy keys** — the defaults' estimate (head + tail, exact scores,
sinks and window) with V read only where a key's weight is at least eps × the step's largest, the skipped
keys' weight left in the denominator: the fraction of the kept keys' V rows read and the output's relative
error against the estimate with every V (beside the estimate's own against dense).

Plain torch on the definitions in ``kvpass.lowering.reference``; the model is prefilled densely on CPython
sources (``kvpass.eval.text.python_source_text``) and the next ``--queries`` positions' queries are taken.

    python scripts/fewer_reads.py --context 16384          # ~6 min on 2 cores (the prefill)
"""

from __future__ import annotations

import argparse
import collections

import torch
from kvpass.lowering.reference import (
    estimator_scores,
    sketch_candidates,
    sketch_codes,
    sketch_project,
    sketch_query,
    sketch_scale,
    sketch_scores,
)
from kvpass.runtime.config import Options

from kvpass.eval import retrieval
from kvpass.eval.text import python_source_text
from kvpass.models import load_model


def capture(model_name: str, context: int, queries: int) -> dict[str, retrieval.Site]:
    """site → its queries [1, H, queries, D], keys and values [1, Hkv, context + queries, D] of a dense pass."""
    model, tok = load_model(model_name)
    ids = tok(python_source_text(), return_tensors="pt", add_special_tokens=False)["input_ids"]
    return retrieval.capture(model, ids[:, :context + queries], context, queries, values=True)


def top_mask(scores: torch.Tensor, m: int) -> torch.Tensor:
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(m, -1).indices, True)


EXACT = "exact tile bounds (16 keys): tiles that cannot be skipped"


def measure(q: torch.Tensor, k: torch.Tensor, context: int, budget: float, stats: dict) -> None:
    opts = Options()
    B, H, T, D = q.shape
    hkv = k.shape[1]
    keys = k[:, :, opts.sink_size:context - opts.window_size].float()  # the offloaded keys
    n = keys.shape[2] // 16 * 16
    keys = keys[:, :, :n]
    mu = keys.mean(2)
    scale = sketch_scale(keys, mu, 4)
    codes = sketch_codes(keys, mu, scale, 4).float()  # [1, Hkv, n, D]
    qg = q.float().view(B, hkv, H // hkv, T, D)
    qq = sketch_query(sketch_project(qg, scale))  # [1, Hkv, G, T, D], the integer rows the bounds take
    s = sketch_scores(qg, codes, scale)  # [1, Hkv, G, T, n]
    m = max(1, round(budget * n))
    best = sketch_candidates(qg, codes, scale, m)  # the defaults' head
    for tile in (8, 16):
        t = codes.view(B, hkv, n // tile, tile, D)
        hi, lo = t.amax(3).transpose(-1, -2)[:, :, None], t.amin(3).transpose(-1, -2)[:, :, None]
        bound = qq.clamp_min(0) @ hi + qq.clamp_max(0) @ lo  # [1, Hkv, G, T, tiles]
        centroid = qq @ t.mean(3).transpose(-1, -2)[:, :, None]
        if tile == 16:
            m_th = s.topk(m, -1).values[..., -1:]
            stats[EXACT].append(float((bound >= m_th).float().mean()))
        in_tiles = best.view(*best.shape[:-1], n // tile, tile).sum(-1)
        for frac in (0.1, 0.2, 0.3):
            nt = max(1, round(frac * n / tile))
            for name, rank in (("bound", bound), ("centroid", centroid), ("bound + centroid", bound + centroid)):
                kept = (in_tiles * top_mask(rank, nt)).sum(-1).float() / m
                stats[f"best {frac:.0%} of {tile}-key tiles by {name}: recall"].append(float(kept.mean()))
    x = keys - mu[:, :, None]
    std = x.std(2)[:, :, None]
    coarse = {"sign": x.sign(), "sign x std": x.sign() * std,
              "int2": (x / std).round().clamp(-2, 1) * std}
    for name, c in coarse.items():
        p = qg @ c.transpose(-1, -2)[:, :, None]
        for frac in (0.05, 0.1, 0.2):
            kept = (best & top_mask(p, round(frac * n))).sum(-1).float() / m
            stats[f"{name} prefilter, best {frac:.0%} re-ranked: recall"].append(float(kept.mean()))


def measure_values(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int, budget: float,
                   stats: dict) -> None:
    """V only for the heavy keys, at each of the queries' own steps (query t sees context + t + 1 keys)."""
    opts = Options()
    B, H, T, D = q.shape
    hkv = k.shape[1]
    S, W, r = opts.sink_size, opts.window_size, opts.tail_stride
    for t in range(T):
        n_ctx = context + t + 1
        kk, vv = k[:, :, :n_ctx].float(), v[:, :, :n_ctx].float()
        off = slice(S, n_ctx - W)
        keys = kk[:, :, off]
        n = keys.shape[2]
        mu = keys.mean(2)
        scale = sketch_scale(keys, mu, 4)
        qg = q[:, :, t].float().view(B, hkv, H // hkv, 1, D)
        sketch = (sketch_codes(keys, mu, scale, 4), scale)
        offset = torch.full((B, hkv), t % r)  # the tail sample's start (the store draws it per step)
        so, _ = estimator_scores(qg, keys, D ** -0.5, "topk", budget=max(1, round(budget * n)), sketch=sketch,
                                 stride=r, offset=offset)  # the head + tail estimate's offloaded scores
        s = (qg @ kk.transpose(-1, -2)[:, :, None] * D ** -0.5)[:, :, :, 0]  # [1, Hkv, G, n_ctx]
        so = so[:, :, :, 0]
        logw = s.clone()
        logw[..., off] = so
        w = logw.softmax(-1)
        est = w @ vv
        dense = s.softmax(-1) @ vv
        stats["the estimate's own relative error against dense"].append(
            float(((est - dense).norm(dim=-1) / dense.norm(dim=-1)).mean()))
        kept = torch.isfinite(so)
        for eps in (1e-2, 1e-3, 1e-4):
            heavy = w >= eps * w.amax(-1, keepdim=True)
            o = (w * heavy) @ vv
            stats[f"V where weight >= {eps:g} x max: V rows read / kept"].append(
                float((heavy[..., off] & kept).sum() / kept.sum()))
            stats[f"V where weight >= {eps:g} x max: relative error against every V"].append(
                float(((o - est).norm(dim=-1) / est.norm(dim=-1)).mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--budget", type=float, default=Options().budget)
    a = ap.parse_args()
    stats: dict[str, list[float]] = collections.defaultdict(list, {EXACT: []})
    for site in capture(a.model, a.context, a.queries).values():
        q, k, v = site.q, site.k, site.v
        measure(q, k, a.context, a.budget, stats)
        measure_values(q, k, v, a.context, a.budget, stats)
    print(f"{a.model}, {a.context} tokens, {a.queries} queries, int4 top {a.budget:.1%}; mean (worst layer)")
    for name, v in stats.items():
        worst = max(v) if "skipped" in name or "error" in name else min(v)
        print(f"  {name:62s} {sum(v) / len(v):.3f} ({worst:.3f})")


if __name__ == "__main__":
    main()
