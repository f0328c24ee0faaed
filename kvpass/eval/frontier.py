"""The quality/keys frontier: next-token KL(dense ‖ config) and perplexity against the fraction of the
context's keys a configuration attends, teacher-forced on real text.

How it is measured, fast and faithful.  The text's first ``prefix`` tokens are prefilled densely once
(kvpass's prefill is dense attention too).  The next ``tokens`` tokens are then fed as one block, with the
model's attention replaced by kvpass's decode step for each query in turn: at every layer a ``KVStore``
(the runtime's own store, index and C++ kernel, with the configuration's options) receives the prefix's
K/V in one append, as the compiled model's prefill does, then for query t the block's token t, and
attends as a decode step would.  Teacher forcing makes this equal to decoding the block token by token
through ``torch.compile(backend="kvpass")`` — the logits of position t depend only on keys ≤ t, and each
layer's K/V come from the sparse outputs of the layers below (tests/eval/test_frontier.py checks the
equality against the compiled model) — without a prefill per configuration.

"Keys attended" of one query at one layer: the static slots it sees (sinks + window, all of them once
the context is longer than S + W) plus the offloaded keys that enter its estimate (sample: every
retrieved key; topk/oracle: the B kept, plus the tail sample's keys; exact: all), over the context
length (position + 1).  A layer kvpass leaves dense attends all of them.  "Keys scored" counts what the
CPU kernel computes a score for (topk: every candidate; oracle: every key; both: the tail sample's keys)
— the cost side.  Both are averaged over layers, query heads
and steps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvpass.lowering.reference import (
    best_of,
    estimator_scores,
    lsh_candidates,
    sketch_scores,
)
from kvpass.runtime import KVStore
from kvpass.runtime.config import Options, parse_options
from kvpass.sites import layer_of


@dataclass
class Point:
    """One configuration's place on the frontier."""
    config: str
    options: dict | None       # the kvpass options (None: dense)
    nll: float                 # mean negative log-likelihood of the true next token (nats)
    kl: float                  # mean KL(dense ‖ config) of the next-token distribution (nats)
    attended: float            # fraction of all context keys in the attention (see the module doc)
    scored: float              # fraction of all context keys the kernel scored
    offloaded_read: float      # fraction of the offloaded keys scored (what runtime_stats reports)
    tokens: int
    top1: float = 1.0          # fraction of steps whose argmax equals dense's
    recall: float | None = None  # retrieval: fraction of the top-1% offloaded keys (by exact score) retrieved
    mass: float | None = None    # retrieval: fraction of the offloaded keys' attention weight retrieved
    distinct: float | None = None  # retrieval: distinct keys a GQA group's query heads chose, per key chosen
    # the bytes the CPU kernel read (codes scanned + distinct K/V rows, its own counters) over the bytes of the
    # offloaded keys' K and V (what dense attention reads of them), over all sites and steps
    bytes_read: float | None = None
    per_layer: list[float] = field(default_factory=list)  # keys attended per layer
    recall_per_layer: dict[str, float] = field(default_factory=dict)  # site -> its mean recall (as ``recall``)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@contextlib.contextmanager
def attention_hook(model: torch.nn.Module, fn) -> Iterator[None]:
    """Routes every ``F.scaled_dot_product_attention`` call made inside ``model`` through
    ``fn(site, orig, q, k, v, *args, **kwargs)``; ``site`` is the innermost module's path (the name the
    compiler gives that attention site, e.g. "model.layers.7.self_attn")."""
    stack: list[str] = []

    def enter(name):
        return lambda module, args: stack.append(name)  # returns None: the inputs stay

    def leave(module, args, output):
        stack.pop()  # returns None: the output stays

    handles = []
    for name, mod in model.named_modules():
        if name:
            handles += [mod.register_forward_pre_hook(enter(name)), mod.register_forward_hook(leave)]
    orig = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        return fn(stack[-1] if stack else "", orig, q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig
        for h in handles:
            h.remove()


class Decoder:
    """kvpass's decode step in place of a model's attention (see the module doc), for one configuration,
    across any number of forward calls: at each site a ``KVStore`` receives, at the site's first call, the
    ``start`` tokens the cache held before (in one append, as the compiled model's prefill), then each
    query's own token in turn, and attends as a decode step.  A call whose keys are not the store's plus
    the call's own (a sliding-window layer's bounded cache), a batch, or a layer the options keep dense runs
    the model's own attention."""

    def __init__(self, opts: Options, kv_heads: int, start: int, recall_every: int = 0,
                 q_sq: dict[str, torch.Tensor] | None = None):
        self.opts, self.kv_heads, self.start = opts, kv_heads, start
        self.q_sq = q_sq or {}  # site -> the prefill's mean q² [1, H, D] (``prefill_q_sq``)
        self.recall_every = recall_every
        self.stores: dict[str, KVStore] = {}
        self.recall: list[float] = []  # one per (site, measured step), mean over query heads
        self.recall_by_site: dict[str, list[float]] = {}  # the same, by site
        self.mass: list[float] = []
        self.candidate_mismatch = 0  # query rows whose torch-side candidate count differs from the kernel's
        self._counts: dict[str, list[list[torch.Tensor]]] = {}  # site → [attended, scored, offloaded] per call
        self.distinct = self.candidates = 0  # measured steps: distinct keys a GQA group chose, keys chosen
        self.bytes_read = self.bytes_dense = 0  # the kernel's reads (KVStore.last_step_reads), summed

    def _counted(self, i: int) -> dict[str, torch.Tensor]:
        return {s: torch.cat(c[i]) for s, c in self._counts.items() if c[i]}

    @property
    def attended(self) -> dict[str, torch.Tensor]:
        """site → the fraction of the context's keys each query attended (mean over query heads)."""
        return self._counted(0)

    @property
    def scored(self) -> dict[str, torch.Tensor]:
        return self._counted(1)

    @property
    def offloaded(self) -> dict[str, torch.Tensor]:
        """site → the fraction of the offloaded keys scored (sparse sites only)."""
        return self._counted(2)

    def __call__(self, site, orig, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
        T, n = q.shape[2], k.shape[2]
        store = self.stores.get(site)
        before = store.length if store is not None else self.start
        counts = self._counts.setdefault(site, [[], [], []])
        if q.shape[0] != 1 or n != before + T or layer_of(site) in self.opts.dense_layers:
            counts[0].append(torch.ones(T))
            counts[1].append(torch.ones(T))
            return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)
        # K/V as the model holds them, [1, Hkv, n, D] (a model that repeated them for GQA: one per group)
        step = k.shape[1] // self.kv_heads
        kk, vv = k[:, ::step], v[:, ::step]
        if store is None:
            store = self.stores[site] = KVStore(self.kv_heads, q.shape[3], options=self.opts, dtype=k.dtype,
                                                device=k.device, site=site)
            if before:
                store.append(kk[:, :, :before], vv[:, :, :before])
                if site in self.q_sq:  # the prefill's queries, as the compiled model's prefill hands them
                    q_sq = self.q_sq[site]  # over: a rotated index is fitted to them at its first step
                    store.index.observe_moments(q_sq.reshape(1, self.kv_heads, -1, q_sq.shape[-1]).mean(2),
                                                q_sq.shape[1] // self.kv_heads * before)
        est, static = self.opts.estimator, self.opts.sink_size + self.opts.window_size
        outs, att, sco, off = [], torch.zeros(T), torch.zeros(T), torch.zeros(T)
        for t in range(T):
            p = before + t
            store.append(kk[:, :, p:p + 1], vv[:, :, p:p + 1])
            outs.append(store.attend(q[:, :, t:t + 1], estimator=est, scale=scale))
            n_ctx, n_host = p + 1, store.tokens_offloaded
            n_static = min(static, n_ctx)
            if est == "none" or n_host == 0:
                kept = scored = 0.0
            else:
                kept, scored = float(store.last_kept.float().mean()), float(store.last_scored.float().mean())
            att[t], sco[t] = (n_static + kept) / n_ctx, (n_static + scored) / n_ctx
            off[t] = scored / n_host if n_host else 0.0
            if n_host and est != "none":
                reads = store.last_step_reads
                self.bytes_read += reads["code_bytes"] + reads["row_bytes"]
                self.bytes_dense += reads["dense_bytes"]
            if self.recall_every and t % self.recall_every == 0 and est in ("sample", "topk") and store.index.built:
                self._retrieval(store, q[:, :, t:t + 1], scale)
                self.recall_by_site.setdefault(site, []).append(self.recall[-1])
        for c, x in zip(counts, (att, sco, off)):
            c.append(x)
        return torch.cat(outs, 2)

    def _retrieval(self, store: KVStore, q: torch.Tensor, scale: float | None) -> None:
        """Recall of the top-1% offloaded keys and attention mass covered by the kernel's candidates (LSH:
        keys colliding with the query in ≥ threshold tables, from the same codes; sketch: the budget best
        sketch scores), in plain torch."""
        B, H, _, D = q.shape
        G = H // self.kv_heads
        idx = store.index
        keys, sketch = host_sketch(store)
        n = keys.shape[2]
        qg = q.float().reshape(B, self.kv_heads, G, 1, D)
        q_codes = k_codes = None
        budget = store.resolve_budget(None)
        if sketch is not None:
            cand = best_of(sketch_scores(qg, *sketch), min(n, budget))
        else:  # the kernel's query codes
            q_codes, k_codes = store.last_query_codes.reshape(B, self.kv_heads, G, 1, -1), idx.codes(keys)
            cand = lsh_candidates(q_codes, k_codes, idx.threshold)
        scale = scale if scale is not None else D ** -0.5
        s = (qg @ keys.transpose(-1, -2)[:, :, None]) * scale
        top = s.topk(max(1, n // 100), dim=-1).indices
        # the candidates are the kernel's own: with the tail sample's keys, as many per query row as it scored
        scored = cand.sum(-1)
        r, offset = store.tail_sample(store.options.estimator, budget, n)
        if r:
            _, scored = estimator_scores(qg, keys, scale, "topk", q_codes=q_codes, k_codes=k_codes,
                                         threshold=idx.threshold, budget=budget, sketch=sketch, stride=r, offset=offset)
        self.candidate_mismatch += int((scored.reshape(-1) != store.last_scored.reshape(-1)).sum())
        self.recall.append(float(cand.gather(-1, top).float().mean()))
        self.distinct += int(cand.any(2).sum())
        self.candidates += int(cand.sum())
        self.mass.append(float((s.softmax(-1) * cand).sum(-1).mean()))


def host_sketch(store: KVStore) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """A store's host keys, fp32 [B, Hkv, n, D], and their sketch by the reference definition
    (``LSHIndex.reference_sketch``: (codes, scale), or (codes, scale, unit, rot) for the rotated one), or None
    for an LSH store: what the plain-torch checks of the kernel's choice start from."""
    idx = store.index
    keys = torch.cat(store.host.views()[0], 2).float()
    if not idx.sketch:
        return keys, None
    return keys, idx.reference_sketch(keys)


def decoder(model, options: dict | Options, start: int, recall_every: int = 0, cache=None) -> Decoder:
    """A ``Decoder`` for ``model`` under kvpass ``options``, its cache holding ``start`` tokens (``cache``,
    when made by ``dense_prefix``: its prefill's queries fit a rotated index, as a compiled prefill's do)."""
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return Decoder(parse_options(options), kv_heads, start, recall_every, prefill_q_sq(cache))


def dense_prefix(model, ids: torch.Tensor, prefix: int, chunk: int = 2048, cache=None):
    """The dense KV cache of ``ids[:, :prefix]``, prefilled in chunks (a bounded peak, the same cache);
    ``cache``: one that holds the first tokens of ``ids`` already, extended.  The prefill's queries' q²,
    summed per site, query head and dimension, go with the cache (``prefill_q_sq``)."""
    from transformers import DynamicCache

    from kvpass.hf import cache_kwarg

    cache = DynamicCache(config=model.config) if cache is None else cache
    moments = cache.__dict__.setdefault("kvpass_q_sq", {})  # site -> [Σ q² [B, H, D], queries]

    def record(site, orig, q, k, v, *args, **kwargs):
        acc = moments.setdefault(site, [0.0, 0])
        acc[0], acc[1] = acc[0] + q.detach().float().pow(2).sum(2), acc[1] + q.shape[2]
        return orig(q, k, v, *args, **kwargs)

    with torch.no_grad(), attention_hook(model, record):
        for t0 in range(cache.get_seq_length(), prefix, chunk):
            model(input_ids=ids[:, t0:min(prefix, t0 + chunk)], use_cache=True, **{cache_kwarg(): cache})
    return cache


def prefill_q_sq(cache) -> dict[str, torch.Tensor]:
    """site -> the mean q² [B, H, D] of the queries of ``dense_prefix``'s prefill (empty for another cache;
    a cache cropped and extended again keeps the cropped tokens' queries in it, as a store forked from a
    longer prefill keeps the index fitted then)."""
    return {site: total / count for site, (total, count) in getattr(cache, "kvpass_q_sq", {}).items() if count}


def teacher_forced(model, ids: torch.Tensor, prefix: int, tokens: int, options: dict | Options | None,
                   cache, recall_every: int = 0) -> tuple[torch.Tensor, Decoder | None]:
    """Log-probabilities [tokens, vocab] (fp32) of the ``tokens`` decode steps at positions prefix ..
    prefix + tokens − 1 of ``ids``, with the dense prefix ``cache`` (left as it was), under kvpass
    ``options`` (None: dense), and the decoder that kept the per-site key counts (and, every
    ``recall_every`` steps, the retriever's recall)."""
    from kvpass.hf import cache_kwarg, crop_to

    dec = None if options is None else decoder(model, options, prefix, recall_every, cache)
    ctx = contextlib.nullcontext() if dec is None else attention_hook(model, dec)
    try:
        with ctx, torch.no_grad():
            out = model(input_ids=ids[:, prefix:prefix + tokens], use_cache=True, **{cache_kwarg(): cache})
    finally:
        crop_to(cache, prefix)
    return out.logits[0].float().log_softmax(-1), dec


def frontier(model, ids: torch.Tensor, configs: dict[str, dict | None], *, prefix: int, tokens: int = 256,
             cache=None, recall_every: int = 0, progress: Callable[[int], object] | None = None) -> list[Point]:
    """Each configuration's ``Point``: ``tokens`` teacher-forced decode steps after a dense ``prefix``-token
    prefill of ``ids`` [1, ≥ prefix + tokens + 1] (the step at position t predicts token t + 1).
    configs: name → kvpass options (None: dense).  ``cache``: the dense prefix cache, if already made.
    ``recall_every``: measure the retriever's recall every that many steps (0: never)."""
    if ids.shape[0] != 1 or ids.shape[1] < prefix + tokens + 1:
        raise ValueError(f"kvpass frontier: need ids [1, >= {prefix + tokens + 1}], got {tuple(ids.shape)}")
    cache = dense_prefix(model, ids, prefix) if cache is None else cache
    target = ids[0, prefix + 1:prefix + tokens + 1]
    dense, _ = teacher_forced(model, ids, prefix, tokens, None, cache)
    points = []
    for name, options in configs.items():
        if options is None:
            logp, att, sco, off, layers, dec = dense, 1.0, 1.0, 1.0, [], None
        else:
            logp, dec = teacher_forced(model, ids, prefix, tokens, options, cache, recall_every)
            layers = [float(a.mean()) for a in dec.attended.values()]
            att = sum(layers) / len(layers)
            sco = float(torch.stack(list(dec.scored.values())).mean())
            off = float(torch.stack(list(dec.offloaded.values())).mean()) if dec.offloaded else 0.0
        nll = -logp.gather(1, target[:, None]).mean().item()
        kl = (dense.exp() * (dense - logp)).sum(-1).clamp_min(0).mean().item()
        top1 = (logp.argmax(-1) == dense.argmax(-1)).float().mean().item()
        recall = sum(dec.recall) / len(dec.recall) if dec and dec.recall else None
        mass = sum(dec.mass) / len(dec.mass) if dec and dec.mass else None
        rows = dec.distinct / dec.candidates if dec and dec.candidates else None
        read = dec.bytes_read / dec.bytes_dense if dec and dec.bytes_dense else None
        by_layer = {site: sum(r) / len(r) for site, r in dec.recall_by_site.items()} if dec else {}
        points.append(Point(name, options, nll, kl, att, sco, off, tokens, top1=top1, recall=recall, mass=mass,
                            distinct=rows, per_layer=layers, bytes_read=read, recall_per_layer=by_layer))
        if progress:
            progress(1)
    return points


# ---------------------------------------------------------------- the sweep, the report

def sweep(quick: bool = False) -> dict[str, dict | None]:
    """The configurations of ``kvpass eval --frontier``: dense, static-only at two windows, the MagicPIG
    preset, and each estimator across its own knob — sample over the SimHash bits K (fewer bits, more
    keys), topk (LSH candidates or the sketch retriever's) and oracle over the budget (a fraction of the
    offloaded keys), and the sketch's head with a tail sample (``tail_stride``) at a few (budget, stride),
    the rotated sketch's at two."""
    out: dict[str, dict | None] = {"dense": None, "static-only": {"estimator": "none"},
                                   "static-only W=1024": {"estimator": "none", "window_size": 1024},
                                   "magicpig": {"preset": "magicpig"}}
    bits, budgets = ((9,), (0.02,)) if quick else ((8, 9, 11), (0.005, 0.01, 0.02, 0.04))
    for k in bits:
        out[f"sample K={k}"] = {"estimator": "sample", "lsh_k": k}
    for b in budgets:
        out[f"oracle {b:.1%}"] = {"estimator": "oracle", "budget": b}
        out[f"sketch {b:.1%}"] = {"estimator": "topk", "retriever": "sketch", "budget": b}
    for b in budgets[1:3] or budgets:  # the LSH candidates' best: no better than sampling them (measured)
        out[f"topk {b:.1%}"] = {"estimator": "topk", "budget": b}
    # the sketch's head plus a tail sample of every r-th other key
    heads = ((0.015, 100),) if quick else ((0.01, 100), (0.015, 100), (0.01, 64), (0.015, 128), (0.02, 100))
    for b, r in heads:
        out[f"sketch {b:.1%} + 1/{r}"] = {"estimator": "topk", "retriever": "sketch", "budget": b, "tail_stride": r}
    for b, r in heads[:2]:  # the rotated sketch's head and tail (the defaults' budget and a smaller one)
        out[f"rotated {b:.1%} + 1/{r}"] = {"estimator": "topk", "retriever": "rotated", "budget": b, "tail_stride": r}
    return out


def format_points(points: list[Point]) -> str:
    dense = next((p for p in points if p.options is None), None)
    head = (f"{'config':22s} | keys attended | keys scored | KL(dense‖·) | perplexity | vs dense |  top-1 "
            f"|     recall@1% |  mass | distinct | bytes read")
    lines = [head, "-" * len(head)]
    for p in points:
        rel = f"{p.ppl / dense.ppl - 1:+8.2%}" if dense else "-"
        rec = f"{p.recall:13.1%}" if p.recall is not None else f"{'-':>13s}"
        mass = f"{p.mass:5.1%}" if p.mass is not None else "    -"
        rows = f"{p.distinct:8.2f}" if p.distinct is not None else "       -"
        read = f"{p.bytes_read:10.2%}" if p.bytes_read is not None else f"{'-':>10s}"
        lines.append(f"{p.config:22s} | {p.attended:13.2%} | {p.scored:11.2%} | {p.kl:11.4f} | {p.ppl:10.3f} | "
                     f"{rel} | {p.top1:6.1%} | {rec} | {mass} | {rows} | {read}")
    return "\n".join(lines)


def to_json(points: list[Point], meta: dict) -> dict:
    return {"meta": meta, "points": [
        {"config": p.config, "options": p.options, "kl": p.kl, "nll": p.nll, "perplexity": p.ppl,
         "keys_attended": p.attended, "keys_scored": p.scored, "offloaded_keys_scored": p.offloaded_read,
         "top1_agreement": p.top1, "retriever_recall_top1pct": p.recall, "retriever_attention_mass": p.mass,
         "gqa_distinct_per_key": p.distinct, "host_bytes_read_vs_dense": p.bytes_read,
         "keys_attended_per_layer": p.per_layer, "retriever_recall_top1pct_per_layer": p.recall_per_layer,
         "tokens": p.tokens} for p in points]}


def _family(p: Point) -> str:
    o = p.options or {}
    if o.get("preset"):
        return o["preset"]
    if o.get("tail_stride"):
        return "head + tail"
    if o.get("retriever") == "sketch":
        return "topk (sketch)"
    return {"none": "static-only"}.get(o.get("estimator"), o.get("estimator", "dense"))


def style_panel(ax, *, kl: bool, title: str, ylabel: str) -> None:
    """One panel of a frontier plot: keys attended (%, log) across; KL (log, titled) or Δperplexity (a zero
    line) up; the 3% line."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if kl:
        ax.set_yscale("log")
        ax.set_title(title)
    else:
        ax.axhline(0, color="black", lw=1)
    ax.axvline(3, color="gray", ls=":", lw=1)
    ax.set_xlabel("context keys attended per step (%, log; sinks + window included)")
    ax.set_ylabel(ylabel)


def plot(path, runs: dict[str, list[Point]], title: str) -> None:
    """KL and Δperplexity against keys attended, one panel pair per run (e.g. per prefix length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sample": "tab:blue", "topk": "tab:orange", "topk (sketch)": "tab:brown", "oracle": "tab:green", "magicpig": "tab:purple",
              "head + tail": "tab:cyan", "static-only": "tab:red", "exact": "black"}
    fig, axes = plt.subplots(2, len(runs), figsize=(5.5 * len(runs), 8), squeeze=False)
    for col, (label, points) in enumerate(runs.items()):
        dense = next((p for p in points if p.options is None), None)
        for row, (ylabel, val) in enumerate((("KL(dense ‖ config), nats", lambda p: max(p.kl, 1e-5)),
                                             ("perplexity vs dense (%)",
                                              lambda p, d=dense: 100 * (p.ppl / d.ppl - 1) if d else 0.0))):
            ax = axes[row][col]
            for fam in dict.fromkeys(_family(p) for p in points if p.options is not None):
                pts = sorted((100 * p.attended, val(p)) for p in points if p.options is not None and _family(p) == fam)
                ax.plot(*zip(*pts), "o-" if len(pts) > 1 else "s", color=colors.get(fam, "gray"), label=fam)
            style_panel(ax, kl=row == 0, title=label, ylabel=ylabel)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
