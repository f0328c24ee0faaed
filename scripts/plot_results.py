"""The headline plot of docs/quality.md (and the README), drawn from the frontier runs stored in docs/ — no model
is run.  Qwen2.5-Coder-0.5B, KL(dense ‖ config) and perplexity against the share of the context's keys
attended, at 16k and at 32k inside the model's context.

    python scripts/plot_results.py [--output docs/results-qwen2.5-coder-0.5b.png]

Each point is one stored measurement (``docs/frontier-*.json``); the series are named here, by the config names
those files give, because the runs span versions whose defaults differed (an old file's options are the
options of its day).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"

# panel -> [(file, run key or None)]: the stored runs each panel draws from
PANELS = {
    "16k prefix (16,384 tokens)": [("frontier-head-tail-kernel-16k.json", None),
                                   ("frontier-qwen2.5-coder-0.5b.json", "16384")],
    "32k, inside the context (prefix 32,511)": [("frontier-head-tail-kernel-32k-inside.json", None),
                                                ("frontier-qwen2.5-coder-0.5b-32k-inside.json", None)],
}
# series label -> (style, predicate on a config name); first match wins, unmatched points are left out
SERIES = [
    ("kvpass defaults (1.5% + every 100th)", {"marker": "*", "ms": 16, "color": "tab:cyan", "ls": ""},
     lambda c: c.startswith("kvpass defaults (1.5%")),
    ("head + tail, other budgets / strides", {"marker": "o", "color": "tab:cyan", "ls": "", "mfc": "none"},
     lambda c: c.startswith("sketch") and "+ 1/" in c),
    ("top-k by the int4/int8 sketch, no tail", {"marker": "s", "color": "tab:brown", "ls": "-"},
     lambda c: c.startswith("top 2%") or (c.startswith("sketch") and "%" in c)),
    ("oracle (exact top-k, scores every key)", {"marker": "^", "color": "tab:green", "ls": "-"},
     lambda c: c.startswith("oracle")),
    ("MagicPIG preset (LSH sampling, K=10, L=150)", {"marker": "P", "ms": 12, "color": "tab:purple", "ls": ""},
     lambda c: c == "magicpig"),
    ("LSH sampling, K = 8 / 9 / 11", {"marker": "D", "color": "tab:blue", "ls": "-", "mfc": "none"},
     lambda c: c.startswith("sample K=")),
    ("static-only (StreamingLLM, 4 + 64 / 4 + 1024)", {"marker": "x", "color": "tab:red", "ls": ""},
     lambda c: c.startswith("static-only")),
]


def load(file: str, run: str | None) -> list[dict]:
    data = json.loads((DOCS / file).read_text())
    return data["runs"][run] if run else data["points"]


def series(points: list[dict]) -> dict[str, list[tuple[float, float, float]]]:
    """label -> sorted (keys attended %, KL, perplexity vs dense %) of the panel's points."""
    dense = {round(p["perplexity"], 6) for p in points if p["options"] is None}
    assert len(dense) == 1, f"the runs of a panel must share one dense reference, found {dense}"
    ppl = dense.pop()
    out: dict[str, list] = {}
    for p in points:
        if p["options"] is None:
            continue
        label = next((name for name, _, match in SERIES if match(p["config"])), None)
        if label is not None:
            out.setdefault(label, []).append((100 * p["keys_attended"], p["kl"], 100 * (p["perplexity"] / ppl - 1)))
    return {k: sorted(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default=str(DOCS / "results-qwen2.5-coder-0.5b.png"))
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvpass.eval.frontier import style_panel

    fig, axes = plt.subplots(2, len(PANELS), figsize=(6 * len(PANELS), 8.5), squeeze=False)
    for col, (title, sources) in enumerate(PANELS.items()):
        found = series([p for f, r in sources for p in load(f, r)])
        for row, (ylabel, pick) in enumerate((("KL(dense ‖ config), nats (log)", 1),
                                              ("perplexity vs dense (%)", 2))):
            ax = axes[row][col]
            for label, style, _ in SERIES:
                if label in found:
                    pts = found[label]
                    ax.plot([p[0] for p in pts], [p[pick] for p in pts], label=label, **style)
            style_panel(ax, kl=row == 0, title=title, ylabel=ylabel)
            ax.set_xlim(0.3, 25)  # one scale for both panels: the 3% line and the static part's 0.2-0.4% in view
            ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines() if not h.get_label().startswith("_")}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Qwen2.5-Coder-0.5B, 256 teacher-forced steps of CPython sources, through the runtime's store "
                 "and kernel (2-vCPU AMD EPYC VM, 2026-11-30)", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(args.output, dpi=100)
    plt.close(fig)
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
