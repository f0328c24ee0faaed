"""``kvpass eval``: quality of kvpass configurations side by side with dense, offline.

* pass-key retrieval (the landmark-attention / Quest style generator: filler sentences, one pass key at
  a chosen depth, the question at the end) and the RULER-style tasks of ``kvpass.tasks`` — greedy
  decoding, scored on the continuation;
* perplexity and next-token KL(dense ‖ config) on real text shipped with CPython (``pydoc_data``):
  the document's first ``prefix`` tokens are prefilled, the next ``tokens`` are scored teacher-forced,
  every scored position a kvpass decode step (measured by ``kvpass.frontier``, which equals decoding
  through the compiled model without a prefill per configuration);
* configurations: dense (the model unchanged), static-only (sinks + window: StreamingLLM), and at each
  budget oracle top-B, kvpass-topk (the defaults: the B best keys by the int8 key sketch) and kvpass-sample (the budget
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

from kvpass.tasks import NOISE, Sample, make_samples

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


def _keys_read(opts: dict) -> float:
    """Fraction of the offloaded keys attended at the last step: the kernel's count; for the oracle its
    budget (it scores every key to choose them, which is why it is only a reference)."""
    import kvpass

    if opts["estimator"] == "oracle" and isinstance(opts.get("budget"), float):
        return opts["budget"]
    return kvpass.runtime_stats()["keys_read_fraction"]


def _compiled(model, fwd, opts: dict | None, sink_size: int, window_size: int):
    if opts is None:
        model.forward = fwd
        return
    torch._dynamo.reset()
    model.forward = torch.compile(fwd, backend="kvpass", options={
        "sink_size": sink_size, "window_size": window_size, "inductor": False, **opts})


# ---------------------------------------------------------------- generation tasks

@dataclass
class TaskResult:
    config: str
    task: str
    scores: list[float] = field(default_factory=list)
    keys_read: list[float] = field(default_factory=list)
    cells: dict[tuple[int, float], float] = field(default_factory=dict)  # (length, depth) → mean score

    @property
    def accuracy(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else float("nan")

    @property
    def read(self) -> float | None:
        return sum(self.keys_read) / len(self.keys_read) if self.keys_read else None


def run_tasks(model, tok, samples: list[Sample], configs: dict[str, dict | None], *, sink_size: int = 4,
              window_size: int = 64, progress: Callable[[int], object] | None = None) -> list[TaskResult]:
    """Greedy continuation of every sample under every configuration, scored."""
    import kvpass
    from kvpass.hf import greedy

    results: dict[tuple[str, str], TaskResult] = {}
    fwd = model.forward
    try:
        for name, opts in configs.items():
            _compiled(model, fwd, opts, sink_size, window_size)
            for s in samples:
                kvpass.reset()
                with torch.no_grad():
                    out, _ = greedy(model, s.ids, s.new_tokens)
                text = tok.decode(out[0, s.ids.shape[1]:], skip_special_tokens=True)
                r = results.setdefault((name, s.task), TaskResult(name, s.task))
                score = s.score(text)
                r.scores.append(score)
                cell = r.cells.setdefault((s.length, s.depth), [])
                cell.append(score)
                if opts is not None and opts["estimator"] != "none":
                    r.keys_read.append(_keys_read(opts))
                if progress:
                    progress(1)
    finally:
        model.forward = fwd
        torch._dynamo.reset()
    for r in results.values():
        r.cells = {k: sum(v) / len(v) for k, v in r.cells.items()}
    return list(results.values())


PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there. ")


def passkey_prompt(tok, length: int, depth: float, key: str) -> torch.Tensor:
    """Token ids [1, ~length] of plain text (no chat template: the completion form is what a small
    model answers reliably): preamble, filler with the key sentence at ``depth`` (0 = start, 1 = end),
    then the question, ending "The pass key is"."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    fixed = len(tok(PREAMBLE + needle + question)["input_ids"])
    n_fill = max(1, (length - fixed) // len(tok(NOISE)["input_ids"]))
    at = round(depth * n_fill)
    text = PREAMBLE + NOISE * at + needle + NOISE * (n_fill - at) + question
    return tok(text, return_tensors="pt")["input_ids"]


def passkey_samples(tok, lengths, depths, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        for d in depths:
            key = str(rng.randint(10000, 99999))
            out.append(Sample("passkey", n, d, passkey_prompt(tok, n, d, key), [key], 10))
    return out


def passkey(model, tok, lengths, depths, *, configs=CONFIGS, progress=None, **kw) -> list[TaskResult]:
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
    from kvpass.text import reference_text

    ids = tok(reference_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"kvpass eval: the reference text has only {ids.shape[1]} tokens")
    return ids


def text_quality(model, tok, configs: dict[str, dict | None], *, prefix: int = 2048, tokens: int = 256,
                 sink_size: int = 4, window_size: int = 64,
                 progress: Callable[[int], object] | None = None) -> list[TextResult]:
    """Perplexity and next-token KL vs dense over ``tokens`` decode steps after a ``prefix``-token
    prefill of real text (teacher-forced, measured by ``kvpass.frontier``)."""
    from kvpass.frontier import frontier

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
    tasks = list(dict.fromkeys(r.task for r in results))
    configs = list(dict.fromkeys(r.config for r in results))
    by = {(r.config, r.task): r for r in results}
    head = f"{'config':18s} | " + " | ".join(f"{t:>17s}" for t in tasks) + " | keys read"
    lines = [head, "-" * len(head)]
    for c in configs:
        rows = [by.get((c, t)) for t in tasks]
        cells = " | ".join(f"{r.accuracy:17.0%}" if r else f"{'-':>17s}" for r in rows)
        reads = [r.read for r in rows if r and r.read is not None]
        read = "100%" if c == "dense" else "0%" if c == "static-only" else (
            f"{sum(reads) / len(reads):.2%}" if reads else "-")
        lines.append(f"{c:18s} | {cells} | {read}")
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
            "tasks": [{"config": r.config, "task": r.task, "accuracy": r.accuracy, "keys_read": r.read,
                       "samples": len(r.scores),
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
    for r in task_results:
        fam = _family(r.config)
        x = 100.0 if r.config == "dense" else (r.read * 100 if r.read else None)
        if x is None:
            continue
        ax.scatter(x, 100 * r.accuracy, color=colors.get(fam, "black"), marker=markers[r.task], s=40)
    for r in task_results:
        if r.config == "static-only":
            ax.scatter(0.05, 100 * r.accuracy, color="tab:red", marker=markers[r.task], s=40)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", ls="", label=f) for f, c in
               {**colors, "dense": "black", "static-only (drawn at 0.05%)": "tab:red"}.items()]
    handles += [Line2D([], [], color="gray", marker=markers[t], ls="", label=t) for t in tasks]
    ax.legend(handles=handles, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("offloaded keys scored per decode step (%, log scale)")
    ax.set_ylabel("task score (%)")
    ax.set_ylim(-5, 105)
    ax.set_title("pass key and RULER-style tasks")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

    pk = [r for r in task_results if r.task == "passkey" and r.cells]
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
        ax.set_title(r.config, fontsize=9)
    axes[0][0].set_ylabel("pass-key depth")
    fig.colorbar(im, ax=axes[0].tolist(), label="found (fraction)")
    fig.suptitle(f"pass key found, depth × length — {title}", fontsize=9)
    fig.savefig(path.with_name(path.stem + "-passkey-heatmap" + path.suffix), dpi=110, bbox_inches="tight")
    plt.close(fig)
