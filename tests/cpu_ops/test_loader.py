"""The C++ build's lock: a build killed mid-way must not hang every later process."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import textwrap

from cpu_ops import loader


def test_a_lock_file_left_by_a_killed_build_is_removed(tmp_path):
    # cpp_extension.load waits forever on this file; a dead builder leaves it behind
    (tmp_path / "lock").touch()
    with loader.build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_a_live_build_is_waited_for_not_broken(tmp_path):
    # another process holds the lock and has its own `lock` file: we must wait, not remove it
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from cpu_ops import loader
        with loader.build_lock(Path({str(tmp_path)!r})):
            (Path({str(tmp_path)!r}) / "lock").touch()
            print("held", flush=True)
            time.sleep(1.0)
            (Path({str(tmp_path)!r}) / "lock").unlink()
            (Path({str(tmp_path)!r}) / "built").touch()
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with open(tmp_path / "kvpass.flock", "a") as f:  # the holder has it: a non-blocking try fails
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            raise AssertionError("the build lock was not held by the other process")
        except BlockingIOError:
            pass
    with loader.build_lock(tmp_path):  # blocks until the holder is done
        assert (tmp_path / "built").exists()
    assert holder.wait(timeout=30) == 0
