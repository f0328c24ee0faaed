"""Which keys does a code find?  A retrieval study on a model's own keys and queries.

Each decode step kvpass ranks every offloaded key by a small code of it and attends the best ``budget``
of them (B keys).  How good a code is for that: among the c x B keys it ranks best, the share of the
exact top B (by q·k, per query head) — *recall@c* — and the share of the offloaded keys' attention mass
they hold — *mass@c*.  Both are means over layers, kv heads, query heads and query positions.

The codes: today's int4 sketch (a per-dimension step, no rotation); the rotated code of 4, 3, 2 and 1
bits (whitened by each dimension's standard deviation, one seeded random rotation, a step per key:
``kvpass.lowering.reference.rotated_codes``); and staged rankings of either 4-bit code, whose high bit
planes rank c1 x B keys first and whose whole code re-ranks those.  Bytes per key are what a step reads
per key and kv head (a step per key in fp16 where the code has one; a staged ranking's second stage
counted for the keys it reads).

    kvpass eval --retrieval --model qwen2.5-coder-0.5b --prefix 4096 --queries 48
"""

from __future__ import annotations

import dataclasses

import torch

from kvpass.eval.frontier import attention_hook, dense_prefix
from kvpass.lowering.reference import (
    best_of,
    rotated_codes,
    rotated_query,
    rotated_scores,
    rotated_std,
    rotation,
    sketch_codes,
    sketch_plane_scores,
    sketch_scale,
    sketch_scores,
    staged_candidates,
)
from kvpass.runtime.config import Options

CS = (1, 2, 4, 8)
BITS = (4, 3, 2, 1)
STAGED = ((2, 8), (3, 4))  # (high planes of the 4-bit code, c1)


@dataclasses.dataclass
class Row:
    code: str
    bytes_per_key: float                           # at the model's head_dim
    recall: dict[int, float]                       # c -> mean recall@c
    mass: dict[int, float]                         # c -> mean mass@c
    worst_layer: dict[int, float] = dataclasses.field(default_factory=dict)  # c -> lowest layer mean recall
    worst_site: dict[int, str] = dataclasses.field(default_factory=dict)     # c -> that layer's site


def capture(model, ids: torch.Tensor, context: int, queries: int, values: bool = False) -> dict[str, tuple]:
    """site -> (q [1, H, queries, D], k [1, Hkv, context + queries, D]) — and v like k with ``values`` —:
    the queries of positions context .. context + queries − 1 of ``ids`` and every key before them, from
    a dense pass (fp32)."""
    from kvpass.hf import cache_kwarg

    cache = dense_prefix(model, ids, context)
    out = {}

    def spy(site, orig, q, k, v, *args, **kwargs):
        out[site] = (q[:, :, -queries:].float().clone(), k.float().clone()) + ((v.float().clone(),) if values else ())
        return orig(q, k, v, *args, **kwargs)

    with attention_hook(model, spy), torch.no_grad():
        model(input_ids=ids[:, context:context + queries], use_cache=True, **{cache_kwarg(): cache})
    return out


def site_study(q: torch.Tensor, k: torch.Tensor, context: int, budget: float, options: Options,
               seed: int = 0) -> dict[str, tuple[float, dict[int, float], dict[int, float]]]:
    """One site: code -> (bytes per key, recall@c, mass@c) over its keys [S, context − W) and the queries."""
    B, H, T, D = q.shape
    hkv = k.shape[1]
    keys = k[:, :, options.sink_size:context - options.window_size]
    n = keys.shape[2]
    m = max(1, round(budget * n))
    qg = q.view(B, hkv, H // hkv, T, D)
    mu = keys.mean(2)
    exact = qg @ keys.transpose(-1, -2)[:, :, None]  # [B, Hkv, G, T, n]
    top = best_of(exact, m)
    weight = (exact * D ** -0.5).softmax(-1)

    def score(keep: torch.Tensor) -> tuple[float, float]:
        return float((keep & top).sum(-1).float().mean() / m), float((weight * keep).sum(-1).mean())

    out = {}
    scale = sketch_scale(keys, mu, 4)
    sketch = sketch_codes(keys, mu, scale, 4)
    s = sketch_scores(qg, sketch, scale)
    out["int4 sketch (per-dimension step, no rotation)"] = (D / 2, *_at_cs(s, m, score))
    for planes, c1 in STAGED:
        read = D * planes / 8 + min(1.0, c1 * m / n) * D * (4 - planes) / 8
        out[f"int4 sketch: {planes} high bit planes rank {c1} x B, all 4 re-rank"] = (
            read, *_staged(sketch_plane_scores(qg, sketch, scale, planes), s, c1, m, score))
    std, rot = rotated_std(keys, mu), rotation(D, seed)
    qt = rotated_query(qg, std, rot)
    for bits in BITS:
        codes, step = rotated_codes(keys, mu, std, rot, bits)
        name = f"rotated int{bits}, whitened, step per key" if bits > 1 else "rotated 1 bit (sign), whitened"
        full = rotated_scores(qt, codes, step, bits)
        out[name] = (D * bits / 8 + 2, *_at_cs(full, m, score))
        if bits == 4:
            four = codes, step, full
    for planes, c1 in STAGED:
        read = D * planes / 8 + 2 + min(1.0, c1 * m / n) * D * (4 - planes) / 8
        out[f"rotated int4: {planes} high bit planes rank {c1} x B, all 4 re-rank"] = (
            read, *_staged(rotated_scores(qt, *four[:2], 4, planes), four[2], c1, m, score))
    return out


def _staged(coarse: torch.Tensor, full: torch.Tensor, c1: int, m: int, score):
    """recall@c and mass@c of a staged ranking (``staged_candidates``) for each c ≤ c1."""
    recall, mass = {}, {}
    for c in CS:
        if c <= c1:
            recall[c], mass[c] = score(staged_candidates(coarse, full, c1 * m, c * m))
    return recall, mass


def _at_cs(scores: torch.Tensor, m: int, score) -> tuple[dict[int, float], dict[int, float]]:
    recall, mass = {}, {}
    for c in CS:
        recall[c], mass[c] = score(best_of(scores, min(c * m, scores.shape[-1])))
    return recall, mass


def study(sites: dict[str, tuple[torch.Tensor, torch.Tensor]], context: int, budget: float,
          options: Options | None = None, seed: int = 0, progress=None) -> list[Row]:
    """The rows of the study over every captured site (``capture``): means over sites, and each c's worst
    site (layer) by recall."""
    options = options or Options()
    per_site, names = [], list(sites)
    for q, k in sites.values():
        per_site.append(site_study(q, k, context, budget, options, seed))
        if progress:
            progress(1)
    rows = []
    for name, (nbytes, _, _) in per_site[0].items():
        cs = per_site[0][name][1].keys()
        worst = {c: min(range(len(per_site)), key=lambda i, c=c: per_site[i][name][1][c]) for c in cs}
        rows.append(Row(name, nbytes,
                        {c: sum(s[name][1][c] for s in per_site) / len(per_site) for c in cs},
                        {c: sum(s[name][2][c] for s in per_site) / len(per_site) for c in cs},
                        {c: per_site[i][name][1][c] for c, i in worst.items()},
                        {c: names[i] for c, i in worst.items()}))
    return rows


def format_rows(rows: list[Row]) -> str:
    """A Markdown table: code, bytes per key, then recall@c (mass@c) for each c, and the worst layer's
    recall at c = 2 (and its site)."""
    head = "| code | bytes/key | " + " | ".join(f"c = {c}: recall (mass)" for c in CS) + " | worst layer, c = 2 |"
    lines = [head, "|" + "---|" * (len(CS) + 3)]
    for r in rows:
        cells = [f"{r.recall[c]:.3f} ({r.mass[c]:.3f})" if c in r.recall else "" for c in CS]
        worst = f"{r.worst_layer[2]:.3f} ({r.worst_site[2]})" if 2 in r.worst_layer else ""
        lines.append(f"| {r.code} | {r.bytes_per_key:.1f} | " + " | ".join(cells) + f" | {worst} |")
    return "\n".join(lines)
