"""Which keys does a code find?  A retrieval study on a model's own keys and queries.

Each decode step kvpass ranks every offloaded key by a small code of it and attends the best ``budget``
of them (B keys).  How good a code is for that: among the c x B keys it ranks best, the share of the
exact top B (by q·k, per query head) — *recall@c* — and the share of the offloaded keys' attention mass
they hold — *mass@c*; and the share of the exact top 1% among its best B — *top 1% in B*, the frontier's
recall column (``kvpass eval --frontier``).  All are means over layers, kv heads, query heads and query
positions; each also has its worst layer.

The codes: today's int4 sketch (a per-dimension step, no rotation); the rotated code of 4, 3, 2 and 1
bits (``kvpass.lowering.reference.rotated_codes``: one seeded random rotation, a step per key) with each
dimension whitened by its standard deviation, and — from the prefill's own queries — in the query-aware
unit (``rotated_unit``); and staged rankings of each 4-bit code, whose high bit planes rank c1 x B keys
first and whose whole code re-ranks those.  Bytes per key are what a step reads per key and kv head (a
step per key in fp16 where the code has one; a staged ranking's second stage counted for the keys it
reads).

    kvpass eval --retrieval --model qwen2.5-coder-0.5b --prefix 4096 --queries 48
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from kvpass.eval.frontier import attention_hook, dense_prefix, prefill_q_sq
from kvpass.lowering.reference import (
    best_of,
    rotated_codes,
    rotated_query,
    rotated_scores,
    rotated_std,
    rotated_unit,
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
QUERY_AWARE_BITS = (4, 2)


@dataclasses.dataclass
class Row:
    code: str
    bytes_per_key: float                           # at the model's head_dim
    recall: dict[int, float]                       # c -> mean recall@c
    mass: dict[int, float]                         # c -> mean mass@c
    worst_layer: dict[int, float] = dataclasses.field(default_factory=dict)  # c -> lowest layer mean recall
    worst_site: dict[int, str] = dataclasses.field(default_factory=dict)     # c -> that layer's site
    top1pct: float = 0.0                           # mean share of the exact top 1% among the code's best B
    top1pct_worst: float = 0.0                     # its lowest layer mean
    top1pct_worst_site: str = ""


@dataclasses.dataclass
class Site:
    """One attention site's capture: the queries of the measured positions, every key (and value) before
    them, and the prefill's mean q² per query head and dimension (what the query-aware unit is made of)."""
    q: torch.Tensor                  # [1, H, queries, D]
    k: torch.Tensor                  # [1, Hkv, context + queries, D]
    q_sq: torch.Tensor               # [1, H, D]
    v: torch.Tensor | None = None    # like k


def capture(model, ids: torch.Tensor, context: int, queries: int, values: bool = False) -> dict[str, Site]:
    """site -> ``Site`` of positions context .. context + queries − 1 of ``ids`` (fp32), from a dense pass
    whose prefill of the first ``context`` tokens also gives each site's mean q²."""
    from kvpass.hf import cache_kwarg

    kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    cache = dense_prefix(model, ids, context)
    q_sq = prefill_q_sq(cache)
    out = {}

    def unique(k, heads):  # the keys of each kv head once (a model may hand SDPA its repeat_kv'd keys)
        return k[:, :: heads // kv_heads] if k.shape[1] == heads != kv_heads else k

    def spy(site, orig, q, k, v, *args, **kwargs):
        H = q.shape[1]
        out[site] = Site(q[:, :, -queries:].float().clone(), unique(k, H).float().clone(), q_sq[site],
                         unique(v, H).float().clone() if values else None)
        return orig(q, k, v, *args, **kwargs)

    with attention_hook(model, spy), torch.no_grad():
        model(input_ids=ids[:, context:context + queries], use_cache=True, **{cache_kwarg(): cache})
    return out


# a code's ranking: c -> the c x B keys it ranks best (bool over the keys), for the c it defines
Ranking = Callable[[int], torch.Tensor]


def site_study(site: Site, context: int, budget: float, options: Options,
               seed: int = 0) -> dict[str, tuple[float, dict[int, float], dict[int, float], float]]:
    """One site: code -> (bytes per key, recall@c, mass@c, top 1% in B) over its keys [S, context − W) and
    the queries."""
    q, k = site.q, site.k
    B, H, T, D = q.shape
    hkv = k.shape[1]
    keys = k[:, :, options.sink_size:context - options.window_size]
    n = keys.shape[2]
    m, m1 = max(1, round(budget * n)), max(1, n // 100)
    qg = q.view(B, hkv, H // hkv, T, D)
    mu = keys.mean(2)
    exact = qg @ keys.transpose(-1, -2)[:, :, None]  # [B, Hkv, G, T, n]
    top, top1 = best_of(exact, m), best_of(exact, m1)
    weight = (exact * D ** -0.5).softmax(-1)

    def measure(nbytes: float, rank: Ranking, cs=CS):
        recall, mass, keeps = {}, {}, {}
        for c in cs:
            keep = keeps[c] = rank(c)
            recall[c], mass[c] = float((keep & top).sum(-1).float().mean() / m), float((weight * keep).sum(-1).mean())
        return nbytes, recall, mass, float((keeps[1] & top1).sum(-1).float().mean() / m1)  # the best B: c = 1

    def ranked(scores):
        return lambda c: best_of(scores, min(c * m, n))

    def staged(coarse, full, c1):
        return lambda c: staged_candidates(coarse, full, c1 * m, c * m)

    def stage2(planes, c1, step_bytes):  # stage 1's planes of every key, then the rest of the code for c1 x B
        return D * planes / 8 + step_bytes + min(1.0, c1 * m / n) * D * (4 - planes) / 8

    out = {}
    scale = sketch_scale(keys, mu, 4)
    sketch = sketch_codes(keys, mu, scale, 4)
    s = sketch_scores(qg, sketch, scale)
    out["int4 sketch (per-dimension step, no rotation)"] = measure(D / 2, ranked(s))
    for planes, c1 in STAGED:
        out[f"int4 sketch: {planes} high bit planes rank {c1} x B, all 4 re-rank"] = measure(
            stage2(planes, c1, 0), staged(sketch_plane_scores(qg, sketch, scale, planes), s, c1),
            [c for c in CS if c <= c1])
    std, rot = rotated_std(keys, mu), rotation(D, seed)
    q_sq = site.q_sq.view(B, hkv, H // hkv, D).mean(2)  # the group's queries
    for unit, bits_list, name in ((std, BITS, "whitened"), (rotated_unit(std, q_sq), QUERY_AWARE_BITS, "query-aware")):
        qt = rotated_query(qg, unit, rot)
        for bits in bits_list:
            codes, step = rotated_codes(keys, mu, unit, rot, bits)
            full = rotated_scores(qt, codes, step, bits)
            label = f"rotated int{bits}, {name}, step per key" if bits > 1 else f"rotated 1 bit (sign), {name}"
            out[label] = measure(D * bits / 8 + 2, ranked(full))
            if bits == 4:
                four = codes, step, full
        for planes, c1 in STAGED:
            out[f"rotated int4, {name}: {planes} high bit planes rank {c1} x B, all 4 re-rank"] = measure(
                stage2(planes, c1, 2), staged(rotated_scores(qt, *four[:2], 4, planes), four[2], c1),
                [c for c in CS if c <= c1])
    return out


def study(sites: dict[str, Site], context: int, budget: float, options: Options | None = None, seed: int = 0,
          progress=None) -> list[Row]:
    """The rows of the study over every captured site (``capture``): means over sites, and the worst site
    (layer) of each c's recall and of the top 1% in B."""
    options = options or Options()
    per_site, names = [], list(sites)
    for site in sites.values():
        per_site.append(site_study(site, context, budget, options, seed))
        if progress:
            progress(1)

    def mean(values):
        return sum(values) / len(values)

    rows = []
    for name, (nbytes, recall, _, _) in per_site[0].items():
        worst = {c: min(range(len(per_site)), key=lambda i, c=c: per_site[i][name][1][c]) for c in recall}
        worst1 = min(range(len(per_site)), key=lambda i: per_site[i][name][3])
        rows.append(Row(name, nbytes,
                        {c: mean([s[name][1][c] for s in per_site]) for c in recall},
                        {c: mean([s[name][2][c] for s in per_site]) for c in recall},
                        {c: per_site[i][name][1][c] for c, i in worst.items()},
                        {c: names[i] for c, i in worst.items()},
                        mean([s[name][3] for s in per_site]), per_site[worst1][name][3], names[worst1]))
    return rows


def format_rows(rows: list[Row]) -> str:
    """A Markdown table: code, bytes per key, the top 1% in B (its worst layer), then recall@c (mass@c)
    for each c, and the worst layer's recall at c = 2 (and its site)."""
    head = ("| code | bytes/key | top 1% in B (worst layer) | " + " | ".join(f"c = {c}: recall (mass)" for c in CS)
            + " | worst layer, c = 2 |")
    lines = [head, "|" + "---|" * (len(CS) + 4)]
    for r in rows:
        cells = [f"{r.recall[c]:.3f} ({r.mass[c]:.3f})" if c in r.recall else "" for c in CS]
        worst = f"{r.worst_layer[2]:.3f} ({r.worst_site[2]})" if 2 in r.worst_layer else ""
        lines.append(f"| {r.code} | {r.bytes_per_key:.1f} | {r.top1pct:.3f} ({r.top1pct_worst:.3f}) | "
                     + " | ".join(cells) + f" | {worst} |")
    return "\n".join(lines)
