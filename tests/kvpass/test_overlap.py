"""The overlapped decode step (CUDA: static part on the device while the CPU kernel runs), run on a CPU.

No GPU here: a synchronous stand-in for the stream runtime drives the same code as on CUDA.  It checks
what a CPU can: the result equals the sequential ``KVStore.attend``, and the steps happen in the
designed order (q sent and the static part queued *before* the host waits for q; the host waits for q
alone; the results go back on the copy stream before the main stream merges).  Stream semantics
themselves are checked on a GPU by ``benchmarks/gpu_check.py`` (overlap on vs off, same tokens).
"""

from __future__ import annotations

import contextlib

import kvpass.runtime.store as kvstore_mod
import pytest
import torch
from kvpass.runtime.store import attend_overlapped

from kvpass import KVStore


class _Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


class _Event:
    def __init__(self, log):
        self.log, self.stream = log, None

    def record(self, stream):
        self.stream = stream.name
        self.log.append(f"record on {stream.name}")

    def synchronize(self):
        self.log.append(f"host waits event on {self.stream}")


class SyncStreams:
    """Streams that run everything at once, logging each stream operation."""

    pin_memory = False

    def __init__(self):
        self.log: list[str] = []
        self._main, self._side = _Stream("main", self.log), _Stream("copy", self.log)
        self._cur = self._main

    def current(self, device):
        return self._main

    def side(self, device):
        return self._side

    @contextlib.contextmanager
    def use(self, stream):
        prev, self._cur = self._cur, stream
        self.log.append(f"enter {stream.name}")
        try:
            yield
        finally:
            self._cur = prev

    def event(self):
        return _Event(self.log)


def _filled(G, Tq, n, estimator_seed=0):
    torch.manual_seed(estimator_seed)
    Hkv, D = 2, 16
    store = KVStore(Hkv, D, batch=1, dtype=torch.float32, sink_size=4, window_size=16, seed=3, retriever="lsh")
    k, v = torch.randn(1, Hkv, n, D), torch.randn(1, Hkv, n, D)
    store.append(k, v)
    return store, Hkv * G, D


@pytest.mark.parametrize("estimator", ["sample", "topk", "exact"])
@pytest.mark.parametrize("G,Tq", [(1, 1), (4, 1), (2, 3)])
def test_overlapped_step_equals_sequential(estimator, G, Tq):
    store, H, D = _filled(G, Tq, 700)
    streams = SyncStreams()
    for step in range(3):
        kn, vn = torch.randn(1, 2, Tq, D), torch.randn(1, 2, Tq, D)
        store.append(kn, vn)
        q = torch.randn(1, H, Tq, D)
        ref = store.attend(q, estimator=estimator)
        got = attend_overlapped(store, q, streams, estimator=estimator, budget=None, scale=D ** -0.5,
                                backend="torch")
        assert got.dtype == q.dtype and got.shape == q.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_overlapped_step_runs_in_the_designed_order(monkeypatch):
    store, H, D = _filled(4, 1, 500)
    streams = SyncStreams()
    log = streams.log
    real_static, real_host = kvstore_mod.static_attention, store.attend_host

    def static(*a, **kw):
        log.append("static part")
        return real_static(*a, **kw)

    def host(*a, **kw):
        log.append("cpu kernel")
        return real_host(*a, **kw)

    monkeypatch.setattr(kvstore_mod, "static_attention", static)
    monkeypatch.setattr(store, "attend_host", host)
    store.append(torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D))
    attend_overlapped(store, torch.randn(1, H, 1, D), streams, estimator="sample", budget=None, scale=D ** -0.5,
                      backend="torch")
    assert log == [
        "copy waits main",          # q is produced on the main stream
        "enter copy",               # q -> pinned host buffer on the copy stream
        "record on copy",           # ... and the event the host will wait on
        "static part",              # the device's static part is queued before the host blocks
        "host waits event on copy",  # the host waits for q alone
        "cpu kernel",
        "enter copy",               # (o_d, lse_d) -> device on the copy stream
        "record on copy",           # the event that frees the pinned buffers for the next step
        "main waits copy",          # the merge runs after the results arrived
    ]
    # second step: before overwriting the pinned results, the host waits until the last ones have left
    log.clear()
    store.append(torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D))
    attend_overlapped(store, torch.randn(1, H, 1, D), streams, estimator="sample", budget=None, scale=D ** -0.5,
                      backend="torch")
    assert log.index("host waits event on copy") < log.index("cpu kernel")
    assert log.count("host waits event on copy") == 2


def test_overlap_option_reaches_the_store():
    from kvpass.runtime.config import parse_options

    assert parse_options({"overlap": False}).overlap is False
    assert '"overlap": false' in parse_options({"overlap": False}).to_op_string()
    with pytest.raises(ValueError, match="overlap must be True or False"):
        parse_options({"overlap": "yes"})
    assert KVStore(2, 8, overlap=False).overlap is False and KVStore(2, 8).overlap is True
