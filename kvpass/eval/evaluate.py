"""``kvpass eval``: quality of kvpass configurations side by side with dense, offline.

* pass-key retrieval (the landmark-attention / Quest style generator: filler sentences, one pass key at
  a chosen depth, the question at the end) and the RULER-style tasks of ``kvpass.eval.tasks`` — greedy
  decoding, scored on the continuation;
* perplexity and next-token KL(dense ‖ config) on real text shipped with CPython (``pydoc_data``):
  the document's first ``prefix`` tokens are prefilled, the next ``tokens`` are scored teacher-forced,
  every scored position a kvpass decode step (measured by ``kvpass.eval.frontier``, which equals decoding
  through the compiled model without a prefill per configuration);
* configurations: dense (the model unchanged), static-only (sinks + window: StreamingLLM), and at each
  budget oracle top-B, kvpass-topk (the defaults: the B best keys by the int4 key sketch) and kvpass-sample (the budget
  is set through the SimHash bits K: fewer bits, more keys) — with the fraction of offloaded keys
  actually scored reported for each.
"""

from __future__ import annotations

import math
import platform
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvpass.eval.tasks import NOISE, Sample, common_prefix, encode, make_samples

# SimHash bits for kvpass-sample in a budget sweep (L = 150, threshold 2).  Measured on SmolLM2 (real
# text, 2k context): K = 11, 10, 9, 8 read 1.4%, 3.5%, 8.2%, 18.8% of the offloaded keys
SAMPLE_BITS = {0.01: 11, 0.02: 10, 0.05: 9, 0.10: 8}
BUDGETS = (0.01, 0.02, 0.05, 0.10)


def configs_for(budgets=(0.02,)) -> dict[str, dict | None]:
    """dense, static-only, and oracle / kvpass-topk / kvpass-sample at each budget (fraction of keys)."""
    out: dict[str, dict | None] = {"dense": None, "static-only": {"estimator": "none"}}
    for b in budgets:
        tag = "" if b == 0.02 and len(budgets) == 1 else f"@{b:.0%}"
        out[f"oracle{tag}"] = {"estimator": "oracle", "budget": b}
        out[f"kvpass-topk{tag}"] = {"estimator": "topk", "budget": b}
        bits = SAMPLE_BITS.get(b, 10)  # sampling has no budget knob: fewer SimHash bits read more keys
        out[f"kvpass-sample{tag and f'@K={bits}'}"] = {"estimator": "sample", "lsh_k": bits}
    return out


CONFIGS = configs_for()


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------- generation tasks

# The task configurations: dense, StreamingLLM's static part alone, the exact best keys at the defaults'
# budget (a reference: it scores every key), the MagicPIG preset, and the kvpass defaults.
TASK_CONFIGS: dict[str, dict | None] = {"dense": None, "static-only": {"estimator": "none"},
                                        "oracle": {"estimator": "oracle", "budget": 0.02},
                                        "magicpig": {"preset": "magicpig"}, "kvpass": {}}
# The two set-ups the literature reports: the question decoded through kvpass (the context prefilled
# densely, each question token a decode step), and the whole prompt prefilled densely (kvpass only in
# generation: what ``torch.compile(backend="kvpass")`` does with the prompt).
SETUPS = ("question", "generation")


@dataclass
class TaskResult:
    config: str
    task: str
    setup: str = "generation"
    scores: list[float] = field(default_factory=list)
    attended: list[float] = field(default_factory=list)  # fraction of the context's keys attended, per sample
    cells: dict[tuple[int, float], float] = field(default_factory=dict)  # (length, depth) → mean score
    outputs: list[list[int]] = field(default_factory=list)  # the greedy continuation's tokens, per sample

    @property
    def accuracy(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else float("nan")

    @property
    def read(self) -> float | None:
        return sum(self.attended) / len(self.attended) if self.attended else None


def _greedy_steps(model, cache, feed: torch.Tensor, n: int, dec, keep: bool = False) -> list[int]:
    """``n`` greedy tokens after feeding ``feed`` [1, T] to ``model`` with ``cache``, the attention replaced
    by the frontier's ``dec`` (None: dense); end-of-sequence tokens are suppressed, as ``generate`` does
    with ``min_new_tokens``.  The cache is cropped back to where it was (``keep``: it holds what was fed,
    the last token generated excepted)."""
    import contextlib

    from kvpass.eval.frontier import attention_hook
    from kvpass.hf import cache_kwarg, crop_to

    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    start, out = cache.get_seq_length(), []
    try:
        with contextlib.nullcontext() if dec is None else attention_hook(model, dec), torch.no_grad():
            for _ in range(n):
                logits = model(input_ids=feed, use_cache=True, **{cache_kwarg(): cache}).logits[0, -1].float()
                logits[eos] = -math.inf
                out.append(int(logits.argmax()))
                feed = torch.tensor([[out[-1]]])
    finally:
        if not keep:
            crop_to(cache, start)
    return out


def run_tasks(model, tok, samples: list[Sample], configs: dict[str, dict | None] = TASK_CONFIGS, *,
              setups=SETUPS, progress: Callable[[int], object] | None = None) -> list[TaskResult]:
    """Greedy continuation of every sample under every configuration and set-up, scored.

    One dense prefill of each sample's context serves every configuration and both set-ups; kvpass's decode
    steps are the frontier's (``kvpass.eval.frontier.Decoder``: the runtime's store and kernel, equal to decoding
    through the compiled model — tests/eval/test_evaluate.py checks it against ``generate``).
    ``question``: the question's tokens, then the answer's, are kvpass decode steps; ``generation``: the
    question is prefilled densely, the answer's tokens are decode steps."""
    from kvpass.eval.frontier import decoder, dense_prefix
    from kvpass.hf import crop_to

    unknown = set(setups) - set(SETUPS)
    if unknown:
        raise ValueError(f"kvpass eval: unknown set-up {sorted(unknown)}; choose from {list(SETUPS)}")
    results: dict[tuple[str, str, str], TaskResult] = {}
    cache, held = None, torch.empty(1, 0, dtype=torch.long)  # the dense cache of the last context, its ids
    for s in samples:
        n, q = s.ids.shape[1], s.question
        # a context that begins as the last one did (pass-key prompts differ from the needle on) reuses
        # that much of its cache
        same = common_prefix(held[0], s.ids[0, :n - q])
        if same == 0:
            cache = dense_prefix(model, s.ids, n - q)
        else:
            crop_to(cache, same)
            dense_prefix(model, s.ids, n - q, cache=cache)
        held = s.ids[:, :n - q]
        for setup in setups:
            if setup == "question":
                start, feed, first = n - q, s.ids[:, n - q:], []
            else:  # the whole prompt dense: its next token is dense's, the rest decode steps
                first = _greedy_steps(model, cache, s.ids[:, n - q:], 1, None, keep=True)
                start, feed = n, torch.tensor([first])
            for name, opts in configs.items():
                dec = None if opts is None else decoder(model, opts, start, cache=cache)
                tokens = first + _greedy_steps(model, cache, feed, s.new_tokens - len(first), dec)
                score = s.score(tok.decode(tokens, skip_special_tokens=True))
                r = results.setdefault((name, setup, s.task), TaskResult(name, s.task, setup))
                r.scores.append(score)
                r.outputs.append(tokens)
                r.cells.setdefault((s.length, s.depth), []).append(score)
                if dec is not None:
                    att = list(dec.attended.values())
                    r.attended.append(float(torch.cat(att).mean()) if att else 1.0)
                if progress:
                    progress(1)
            crop_to(cache, n - q)
    for r in results.values():
        r.cells = {k: sum(v) / len(v) for k, v in r.cells.items()}
    return list(results.values())


PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there. ")


def passkey_prompt(tok, length: int, depth: float, key: str) -> tuple[torch.Tensor, int]:
    """Token ids [1, ~length] of plain text (no chat template: the completion form is what a small
    model answers reliably): preamble, filler with the key sentence at ``depth`` (0 = start, 1 = end),
    then the question, ending "The pass key is"; and the question's token count."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    fixed = len(tok(PREAMBLE + needle + question)["input_ids"])
    n_fill = max(1, (length - fixed) // len(tok(NOISE)["input_ids"]))
    at = round(depth * n_fill)
    return encode(tok, PREAMBLE + NOISE * at + needle + NOISE * (n_fill - at), question)


def passkey_samples(tok, lengths, depths, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        for d in depths:
            key = str(rng.randint(10000, 99999))
            ids, q = passkey_prompt(tok, n, d, key)
            out.append(Sample("passkey", n, d, ids, [key], 10, q))
    # deepest needle first: each next prompt shares the filler before its needle with the last (run_tasks
    # prefills only the rest)
    return sorted(out, key=lambda s: (s.length, -s.depth))


def passkey(model, tok, lengths, depths, *, configs=TASK_CONFIGS, progress=None, **kw) -> list[TaskResult]:
    """Pass-key accuracy of each configuration over every (length, depth)."""
    return run_tasks(model, tok, passkey_samples(tok, lengths, depths), configs, progress=progress, **kw)


def ruler_samples(tok, tasks, lengths, depths, seed: int = 0) -> list[Sample]:
    return make_samples(tok, tasks, lengths, depths, seed)


# ---------------------------------------------------------------- perplexity and KL on real text

@dataclass
class TextResult:
    config: str
    nll: float          # mean negative log-likelihood of the true next token (nats)
    kl: float           # mean KL(dense ‖ config) of the next-token distribution (nats)
    keys_read: float | None
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def document_ids(tok, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the Python Language Reference (pydoc_data, shipped with CPython)."""
    from kvpass.eval.text import reference_text

    ids = tok(reference_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"kvpass eval: the reference text has only {ids.shape[1]} tokens")
    return ids


def text_quality(model, tok, configs: dict[str, dict | None], *, prefix: int = 2048, tokens: int = 256,
                 sink_size: int = 4, window_size: int = 64,
                 progress: Callable[[int], object] | None = None) -> list[TextResult]:
    """Perplexity and next-token KL vs dense over ``tokens`` decode steps after a ``prefix``-token
    prefill of real text (teacher-forced, measured by ``kvpass.eval.frontier``)."""
    from kvpass.eval.frontier import frontier

    ids = document_ids(tok, prefix + tokens + 1)
    cfgs = {n: None if o is None else {"sink_size": sink_size, "window_size": window_size, **o}
            for n, o in configs.items()}
    points = frontier(model, ids, cfgs, prefix=prefix, tokens=tokens,
                      progress=(lambda _: progress(tokens)) if progress else None)
    out = []
    for p in points:
        est = (p.options or {}).get("estimator")
        read = None if est in (None, "none") else p.offloaded_read
        if est == "oracle" and isinstance(p.options.get("budget"), float):
            read = p.options["budget"]  # it scores every key to choose them; what it keeps is its budget
        out.append(TextResult(p.config, p.nll, p.kl, read, tokens))
    return out


# ---------------------------------------------------------------- reports

def format_tasks(results: list[TaskResult]) -> str:
    """One row per (configuration, set-up): each task's score and the keys attended (fraction of the
    context's keys, static slots included, mean over layers, heads and decode steps)."""
    tasks = list(dict.fromkeys(r.task for r in results))
    rows = list(dict.fromkeys((r.config, r.setup) for r in results))
    by = {(r.config, r.setup, r.task): r for r in results}
    head = f"{'config':12s} | {'set-up':10s} | " + " | ".join(f"{t:>17s}" for t in tasks) + " | keys attended"
    lines = [head, "-" * len(head)]
    for c, setup in rows:
        rs = [by.get((c, setup, t)) for t in tasks]
        cells = " | ".join(f"{r.accuracy:17.0%}" if r else f"{'-':>17s}" for r in rs)
        reads = [x for r in rs if r for x in r.attended]
        read = f"{sum(reads) / len(reads):.2%}" if reads else "100%"
        lines.append(f"{c:12s} | {setup:10s} | {cells} | {read}")
    return "\n".join(lines)


def format_text(results: list[TextResult]) -> str:
    dense = next((r for r in results if r.config == "dense"), None)
    lines = [f"{'config':18s} | perplexity | vs dense | KL(dense‖·) nats | keys read",
             "-" * 74]
    for r in results:
        rel = f"{(r.ppl / dense.ppl - 1):+8.2%}" if dense else "-"
        read = "100%" if r.config == "dense" else "0%" if r.config == "static-only" else (
            f"{r.keys_read:.2%}" if r.keys_read is not None else "-")
        lines.append(f"{r.config:18s} | {r.ppl:10.3f} | {rel} | {r.kl:16.4f} | {read}")
    return "\n".join(lines)


def to_json(task_results: list[TaskResult], text_results: list[TextResult], meta: dict) -> dict:
    return {"meta": meta,
            "tasks": [{"config": r.config, "setup": r.setup, "task": r.task, "accuracy": r.accuracy,
                       "keys_attended": r.read, "samples": len(r.scores),
                       "cells": [{"length": n, "depth": d, "score": s} for (n, d), s in r.cells.items()]}
                      for r in task_results],
            "text": [{"config": r.config, "perplexity": r.ppl, "nll": r.nll, "kl": r.kl, "keys_read": r.keys_read,
                      "tokens": r.tokens} for r in text_results]}


def _family(config: str) -> str:
    return config.split("@")[0]


def plot(path, task_results: list[TaskResult], text_results: list[TextResult], title: str) -> None:
    """Two PNGs: ``path`` (quality vs fraction of keys read, per configuration family) and
    ``path`` with ``-passkey-heatmap`` (pass-key score over depth × length, per configuration)."""
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"oracle": "tab:green", "kvpass-topk": "tab:orange", "kvpass-sample": "tab:blue"}
    ax = axes[0]
    dense = next((r for r in text_results if r.config == "dense"), None)
    if dense and text_results:
        for fam, color in colors.items():
            pts = sorted((100 * r.keys_read, 100 * (r.ppl / dense.ppl - 1)) for r in text_results
                         if _family(r.config) == fam and r.keys_read is not None)
            if pts:
                ax.plot(*zip(*pts), "o-", color=color, label=fam)
        static = next((r for r in text_results if r.config == "static-only"), None)
        if static:
            ax.axhline(100 * (static.ppl / dense.ppl - 1), color="tab:red", ls="--",
                       label=f"static-only (sinks + window): {100 * (static.ppl / dense.ppl - 1):+.1f}%")
        ax.axhline(0, color="black", lw=1, label="dense")
        ax.set_xscale("log")
        ax.set_xlabel("offloaded keys scored per decode step (%, log scale)")
        ax.set_ylabel("perplexity increase over dense (%)")
        ax.set_title(f"real text, {text_results[0].tokens} decode steps")
        ax.legend(fontsize=8)
    ax = axes[1]
    tasks = sorted({r.task for r in task_results})
    markers = dict(zip(tasks, "osD^vP*X"))
    task_colors = {"dense": "black", "static-only": "tab:red", "oracle": "tab:green", "magicpig": "tab:purple",
                   "kvpass": "tab:orange"}
    for r in task_results:
        color = task_colors.get(r.config, "gray")
        ax.scatter(100.0 if r.read is None else 100 * r.read, 100 * r.accuracy, marker=markers[r.task], s=40,
                   color=color if r.setup == "question" else "none", edgecolors=color)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", ls="", label=f) for f, c in task_colors.items()]
    handles += [Line2D([], [], color="gray", marker=markers[t], ls="", label=t) for t in tasks]
    handles += [Line2D([], [], color="gray", marker="o", ls="", label="question through kvpass"),
                Line2D([], [], markerfacecolor="none", markeredgecolor="gray", marker="o", ls="",
                       label="prompt dense, generation through kvpass")]
    ax.legend(handles=handles, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("context keys attended per decode step (%, log scale; static slots included)")
    ax.set_ylabel("task score (%)")
    ax.set_ylim(-5, 105)
    ax.set_title("pass key and RULER-style tasks")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

    pk = [r for r in task_results if r.task == "passkey" and r.cells]
    pk.sort(key=lambda r: (r.setup, list(task_colors).index(r.config) if r.config in task_colors else 99))
    if not pk:
        return
    lengths = sorted({n for r in pk for n, _ in r.cells})
    depths = sorted({d for r in pk for _, d in r.cells})
    fig, axes = plt.subplots(1, len(pk), figsize=(3.2 * len(pk) + 1, 3.6), squeeze=False)
    for i, (ax, r) in enumerate(zip(axes[0], pk)):
        grid = [[r.cells.get((n, d), float("nan")) for n in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths] if i == 0 else [])
        ax.set_xlabel("context (tokens)")
        ax.set_title(f"{r.config}\n({r.setup})", fontsize=8)
    axes[0][0].set_ylabel("pass-key depth")
    fig.colorbar(im, ax=axes[0].tolist(), label="found (fraction)")
    fig.suptitle(f"pass key found, depth × length — {title}", fontsize=9)
    fig.savefig(path.with_name(path.stem + "-passkey-heatmap" + path.suffix), dpi=110, bbox_inches="tight")
    plt.close(fig)
