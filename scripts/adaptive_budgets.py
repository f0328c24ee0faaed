"""Budgets that adapt, measured before building (issue 36, item 4): at equal keys attended, does a budget
chosen per (query head, step) from the code's estimate beat the fixed budget?

On a model's own keys, values and queries (``kvpass.eval.retrieval.capture``), each query's attention over
the context is computed three ways: exactly; with today's defaults' estimate — the sinks and the window
exactly, of the offloaded keys a head of the best by the int4 sketch (``sketch_scores``) counted exactly
plus every ``tail_stride``-th other key weighted by the stride — at a fixed head of 0.5–8% of the
offloaded keys; and the same with each row's head chosen from the sketch's estimate of its weights:

* ``mass p``: the fewest best keys whose estimated weights reach a fraction p of the offloaded keys' mass;
* ``weight t``: every key whose estimated weight is at least t (the head a tail estimator's variance asks
  for: moving key j into the head removes (stride − 1)·w_j² of it, whichever row j is in).

Both between a floor of 0.25% and a cap of 20% of the keys.  The figure is the attention output's error
relative to the exact output, ‖o − o*‖ / ‖o*‖, a mean over layers, heads and queries (and its worst layer),
against the keys attended (head + tail, of the offloaded keys).  A rule that wins here is worth building
into the kernel and measuring by KL on the frontier; one that loses is not.

    python scripts/adaptive_budgets.py --model smollm2-135m --context 4096 --queries 32
"""

from __future__ import annotations

import argparse
import collections

import torch
from kvpass.lowering.reference import (
    sketch_codes,
    sketch_levels,
    sketch_project,
    sketch_scale,
    sketch_scores,
    tail_sample,
)
from kvpass.runtime.config import Options

from kvpass.eval import retrieval
from kvpass.eval.text import python_source_text
from kvpass.models import load_model

FIXED = (0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08)
MASS = (0.7, 0.8, 0.9, 0.95)
WEIGHT = (0.004, 0.002, 0.001, 0.0005, 0.00025)
FLOOR, CAP = 0.0025, 0.2


def site_errors(site: retrieval.Site, context: int, opts: Options, seed: int) -> dict[tuple, tuple[float, float]]:
    """(rule, knob) -> (mean relative output error, keys attended / offloaded keys) at one site."""
    S, W, r = opts.sink_size, opts.window_size, opts.tail_stride
    q, k, v = site.q, site.k[:, :, :context], site.v[:, :, :context]
    B, H, T, D = q.shape
    hkv = k.shape[1]
    qg, scale = q.view(B, hkv, H // hkv, T, D), D ** -0.5
    keys, vals = k[:, :, S:context - W], v[:, :, S:context - W]
    n = keys.shape[2]
    static_k, static_v = torch.cat([k[:, :, :S], k[:, :, context - W:]], 2), torch.cat([v[:, :, :S], v[:, :, context - W:]], 2)
    s_host = (qg @ keys.transpose(-1, -2)[:, :, None]) * scale
    s_static = (qg @ static_k.transpose(-1, -2)[:, :, None]) * scale
    shift = torch.maximum(s_host.amax(-1, keepdim=True), s_static.amax(-1, keepdim=True))

    def sums(s, values, weight=None):  # Σ w e^(s − shift) v and Σ w e^(s − shift)
        e = (s - shift).exp() * (1 if weight is None else weight)
        return e @ values[:, :, None], e.sum(-1, keepdim=True)

    num_static, den_static = sums(s_static, static_v)
    num, den = sums(s_host, vals)
    exact = (num_static + num) / (den_static + den)
    # the sketch's estimate of q·(k − μ): its integer score times the query's rounding step (sketch_query:
    # max |q'_d| over its 8-bit levels)
    mu = keys.mean(2)
    step = sketch_scale(keys, mu, 4)
    qs = sketch_project(qg, step)
    est = sketch_scores(qg, sketch_codes(keys, mu, step, 4), step) * (qs.abs().amax(-1, keepdim=True) / sketch_levels(8))
    est = est * scale
    rank = torch.empty_like(est, dtype=torch.long)
    order = est.sort(dim=-1, descending=True, stable=True).indices
    rank.scatter_(-1, order, torch.arange(n).expand_as(order))
    tail = tail_sample(n, r, torch.randint(r, (B, hkv), generator=torch.Generator().manual_seed(seed)))
    w_est = est.softmax(-1)
    mass = w_est.gather(-1, order).cumsum(-1)

    def error(head_size: torch.Tensor) -> tuple[float, float]:
        head_size = head_size.clamp(max(1, round(FLOOR * n)), round(CAP * n))
        head = rank < head_size[..., None]
        sampled = tail & ~head
        num_h, den_h = sums(s_host, vals, torch.where(head, 1.0, torch.where(sampled, float(r), 0.0)))
        out = (num_static + num_h) / (den_static + den_h)
        err = ((out - exact).norm(dim=-1) / exact.norm(dim=-1)).mean()
        return float(err), float((head | sampled).sum(-1).float().mean() / n)

    rows = {("fixed", b): error(torch.full(est.shape[:-1], round(b * n))) for b in FIXED}
    rows |= {("mass", p): error((mass < p).sum(-1) + 1) for p in MASS}
    rows |= {("weight", t): error((w_est >= t).sum(-1)) for t in WEIGHT}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=32)
    a = ap.parse_args()
    model, tok = load_model(a.model)
    ids = tok(python_source_text(), return_tensors="pt")["input_ids"][:, :a.context + a.queries]
    sites = retrieval.capture(model, ids, a.context, a.queries, values=True)
    per_rule: dict[tuple, list[tuple[float, float]]] = collections.defaultdict(list)
    for i, site in enumerate(sites.values()):
        for rule, got in site_errors(site, a.context, Options(), seed=i).items():
            per_rule[rule].append(got)
    print(f"{a.model}, {a.context} tokens of CPython sources, the next {a.queries} queries; head by the int4 sketch "
          f"+ every {Options().tail_stride}th other key; relative output error, mean over layers (worst layer)")
    print("| rule | keys attended | output error (worst layer) |\n|---|---|---|")
    for (rule, knob), got in per_rule.items():
        err, keys = (sum(x) / len(got) for x in zip(*got))
        print(f"| {rule} {knob} | {keys:.2%} | {err:.4f} ({max(e for e, _ in got):.4f}) |")


if __name__ == "__main__":
    main()
