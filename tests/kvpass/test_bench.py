"""The benchmark gate: ratios measured in one run, compared with a committed baseline."""

import json
from pathlib import Path

from kvpass.bench import TRACKED
from kvpass.cli import main

BASELINE = Path(__file__).resolve().parents[2] / "benchmarks" / "baselines" / "cpu-2core-epyc.json"


def _doctored(tmp_path, factor, drop=None):
    data = json.loads(BASELINE.read_text())
    for b in data["benchmarks"]:
        for key in TRACKED:
            if key in b["extra_info"]:
                b["extra_info"][key] *= factor
    if drop:
        data["benchmarks"] = [b for b in data["benchmarks"] if drop not in b["name"]]
    path = tmp_path / "result.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_committed_baseline_passes_against_itself():
    assert main(["bench", "--compare", str(BASELINE), "--result", str(BASELINE)]) == 0


def test_a_regressed_ratio_fails_the_gate(tmp_path, capsys):
    assert main(["bench", "--compare", str(BASELINE), "--result", _doctored(tmp_path, 0.5)]) == 1
    assert "REGRESSED" in capsys.readouterr().out


def test_noise_within_the_tolerance_passes(tmp_path):
    assert main(["bench", "--compare", str(BASELINE), "--result", _doctored(tmp_path, 0.8)]) == 0


def test_a_missing_benchmark_fails_the_gate(tmp_path, capsys):
    assert main(["bench", "--compare", str(BASELINE), "--result", _doctored(tmp_path, 1.0, drop="32k")]) == 1
    assert "MISSING" in capsys.readouterr().out


def test_a_quick_run_is_compared_on_what_it_measured(tmp_path, capsys):
    from kvpass.bench import compare

    partial = _doctored(tmp_path, 1.0, drop="32k")
    ok, lines = compare(partial, BASELINE, subset=True)
    assert ok and not any("32k" in line for line in lines)
    ok, _ = compare(_doctored(tmp_path, 0.5, drop="32k"), BASELINE, subset=True)
    assert not ok


def test_quick_selection_names_every_suite():
    from kvpass.bench import QUICK, SUITES, suite_dir

    assert all((suite_dir() / s).exists() for s in SUITES)
    assert "e2e" in QUICK and "decode_attention" in QUICK


def test_bench_model_reaches_the_suites(tmp_path, monkeypatch):
    """`kvpass bench --model NAME` runs the suites with KVPASS_BENCH_MODEL set (their model fixtures read it)."""
    import subprocess

    seen = {}
    monkeypatch.setattr(subprocess, "call", lambda cmd, env=None: seen.update(cmd=cmd, env=env) or 0)
    assert main(["bench", "--quick", "--model", "qwen2.5-coder-0.5b", "--output", str(tmp_path / "b.json")]) == 0
    assert seen["env"]["KVPASS_BENCH_MODEL"] == "qwen2.5-coder-0.5b" and "--benchmark-only" in seen["cmd"]
