"""The project's shape: imports run one way between the rooms, and each option is declared once."""

import ast
import importlib
from pathlib import Path

import pytest
import torch

# room → the rooms it may import (besides itself); kvpass/ (the public face) may import every room but the
# evaluation tools (kvpass.eval), which only its CLI runs (EVAL_USERS below)
ALLOWED = {"kvpass.cpu_ops": set(), "kvpass.lowering": {"kvpass.cpu_ops"},
           "kvpass.runtime": {"kvpass.lowering", "kvpass.cpu_ops"},
           "kvpass.eval": {"kvpass", "kvpass.runtime", "kvpass.lowering", "kvpass.cpu_ops"}}
ROOMS = ("kvpass.cpu_ops", "kvpass.lowering", "kvpass.runtime", "kvpass.eval")
# the modules of kvpass/ that run the jobs (and the test helpers) may reach the evaluation tools; the compiler
# (sites, passes, ops, backend, api, export, ...) may not
EVAL_USERS = {"cli.py", "testing.py"}


def _room(module: str) -> str:
    return next((r for r in ROOMS if module == r or module.startswith(r + ".")), "kvpass")


def _imports(path: Path, package: str) -> set[str]:
    """Every kvpass module a file imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kvpass")}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: resolve against the file's package
                mod = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([mod] if mod else []))
            if mod.startswith("kvpass"):
                found.add(mod)
    return found


def test_imports_run_one_way_between_the_rooms():
    arrows = set()
    for room in ("kvpass", *ROOMS):
        pkg = importlib.import_module(room)
        for path in Path(pkg.__path__[0]).rglob("*.py"):
            if room == "kvpass" and path.parent.name == "eval":  # a room of its own, walked as such
                continue
            for mod in _imports(path, room):
                target = _room(mod)
                if target != room:
                    arrows.add((room, target, path.name))
    assert arrows, "the walk found no import between rooms at all"
    wrong = sorted(a for a in arrows if a[0] in ALLOWED and a[1] not in ALLOWED[a[0]])
    wrong += sorted(a for a in arrows if a[0] == "kvpass" and a[1] == "kvpass.eval" and a[2] not in EVAL_USERS)
    assert not wrong, f"imports against the room rules (room, imported room, file): {wrong}"
    assert ("kvpass.eval", "kvpass.runtime", "frontier.py") in arrows  # the walk sees the eval room's arrows


def test_the_arrow_rules_catch_a_compiler_module_importing_the_eval_room(tmp_path):
    """The walk resolves absolute and relative imports alike, so `from .eval import frontier` in the pass would
    be caught."""
    f = tmp_path / "passes.py"
    f.write_text("from .eval import frontier\nimport kvpass.eval.text\n")
    assert _imports(f, "kvpass") == {"kvpass.eval", "kvpass.eval.text"}
    assert {_room(m) for m in _imports(f, "kvpass")} == {"kvpass.eval"}


def test_one_class_named_kvstore():
    from kvpass.runtime import KVStore

    import kvpass

    assert kvpass.KVStore is KVStore
    roots = [Path(importlib.import_module(r).__path__[0]) for r in ("kvpass", *ROOMS)]
    defs = [p for root in roots for p in root.rglob("*.py") if "class KVStore" in p.read_text()]
    assert [p.name for p in defs] == ["store.py"]


def test_a_range_changed_in_the_declaration_is_enforced_at_every_entry(monkeypatch, tmp_path, capsys):
    """window_size's lower bound moved from 1 to 8 in the one declaration: compile, KVStore, export and the
    CLI all refuse window_size=4, with the declared range in the message."""
    from kvpass.runtime import Options

    import kvpass
    from kvpass import export as ex
    from kvpass.cli import main
    from kvpass.testing import tiny_model

    kvpass.KVStore(2, 8, window_size=4)  # fine under the shipped declaration
    monkeypatch.setattr(Options.knob("window_size"), "lo", 8)
    msg = r"window_size must be an int >= 8, got 4"
    model = tiny_model("llama")
    with pytest.raises(Exception, match=msg):
        torch.compile(model, backend="kvpass", options={"window_size": 4})(torch.randint(1, 256, (1, 8)))
    with pytest.raises(ValueError, match=msg):
        kvpass.KVStore(2, 8, window_size=4)
    with pytest.raises(ValueError, match=msg):
        ex.export_onnx(model, tmp_path / "m.onnx", context_len=400, options={"window_size": 4})
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--window-size", "4"])  # refused before any model is loaded
    assert exit_.value.code == 2 and "window_size must be an int >= 8" in capsys.readouterr().err
    kvpass.KVStore(2, 8, window_size=8)
