"""``kvpass bench``: run the pytest-benchmark suites in ``benchmarks/`` and gate on tracked ratios.

Absolute times on shared machines swing by tens of percent from run to run, so the gate compares only
*ratios measured inside one run* (kvpass vs the best dense baseline, same data, same process), which
``extra_info`` of each benchmark carries.  A tracked ratio that falls more than ``tolerance`` below the
baseline's fails the comparison (exit status 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TRACKED = ("speedup_vs_best_dense", "kvpass_vs_dense", "onnx_vs_pytorch")  # higher is better
DEFAULT_TOLERANCE = 0.30


def suite_dir() -> Path:
    here = Path(__file__).resolve().parents[1] / "benchmarks"
    if not here.is_dir():
        raise RuntimeError(f"kvpass bench: the benchmark suites live in the source checkout ({here} is missing)")
    return here


SUITES = ("test_decode_attention.py", "test_contention.py", "test_end_to_end.py", "test_onnx_step.py")
# --quick: the kernel at 8k (all three layouts), SmolLM2 end to end and its ONNX step at 2k, eager pairing (no
# Inductor compiles): a smoke run of every suite in a few minutes on 2 cores
QUICK = "(decode_attention and 8k and not 128k) or (e2e and 2k and eager) or (onnx and 2k and eager)"


def run(output: Path, quick: bool = False, extra: list[str] | None = None, model: str | None = None) -> int:
    """Run the suites with timing on; write pytest-benchmark JSON to ``output``.  ``model``: the model the
    end-to-end and ONNX suites load (a name from ``kvpass models list`` or a folder; default SmolLM2)."""
    cmd = [sys.executable, "-m", "pytest", *[str(suite_dir() / s) for s in SUITES], "--benchmark-only",
           "-q", "-s", "-p", "no:cacheprovider", f"--benchmark-json={output}"]
    if quick:
        cmd += ["-k", QUICK]
    env = {**os.environ, "KVPASS_BENCH_MODEL": model} if model else None
    return subprocess.call(cmd + list(extra or []), env=env)


def tracked(path: Path) -> dict[str, dict[str, float]]:
    """{benchmark name: {ratio name: value}} from a pytest-benchmark JSON file."""
    data = json.loads(Path(path).read_text())
    out = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        vals = {k: float(info[k]) for k in TRACKED if k in info}
        if vals:
            out[b["name"]] = vals
    return out


def compare(current: Path, baseline: Path, tolerance: float = DEFAULT_TOLERANCE,
            subset: bool = False) -> tuple[bool, list[str]]:
    """(ok, report lines): every tracked ratio of the baseline must be present in ``current`` (with
    ``subset``, as for a --quick run: only those ``current`` has) and be at least (1 - tolerance) × the
    baseline's."""
    cur, base = tracked(current), tracked(baseline)
    ok, lines = True, []
    for name, ratios in sorted(base.items()):
        for key, ref in ratios.items():
            got = cur.get(name, {}).get(key)
            if got is None and subset:
                continue
            if got is None:
                ok = False
                lines.append(f"MISSING  {name} {key} (baseline {ref:.2f})")
                continue
            floor = ref * (1 - tolerance)
            status = "ok" if got >= floor else "REGRESSED"
            ok &= got >= floor
            lines.append(f"{status:9s}{name} {key}: {got:.2f} vs baseline {ref:.2f} (floor {floor:.2f})")
    if not base:
        ok = False
        lines.append(f"no tracked ratios in {baseline}")
    return ok, lines


def main(args) -> int:
    if args.compare and args.result:  # compare two files, run nothing
        ok, lines = compare(Path(args.result), Path(args.compare), args.tolerance)
        print("\n".join(lines))
        return 0 if ok else 1
    out = Path(args.output)
    rc = run(out, quick=args.quick, model=getattr(args, "model", None))
    if rc != 0:
        return rc
    if args.compare:
        ok, lines = compare(out, Path(args.compare), args.tolerance, subset=args.quick)
        print("\n".join(lines))
        return 0 if ok else 1
    return 0
