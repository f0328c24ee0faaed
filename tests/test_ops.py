"""Every op kvpass registers (``kvpass::*`` in Python, ``kvpass_cpu::*`` in C++) passes
``torch.library.opcheck``: schema, fake kernel, autograd registration, AOT dispatch.  The test counts the
registered ops, so an op added without a check here fails it."""

import functools
import math

import kvpass.lowering.decode_step
import pytest
import torch
from kvpass.cpu_ops import load
from kvpass.lowering.reference import logp_table
from kvpass.runtime import Options

import kvpass
import kvpass.ops
from kvpass import export as ex

B, H, HKV, D, S, W = 1, 4, 2, 16, 2, 8


def _store(n=400, **knobs):
    knobs.setdefault("estimator", "sample")  # the LSH index (the defaults keep the key sketch)
    store = kvpass.KVStore(HKV, D, sink_size=S, window_size=W, batch=B, **knobs)
    gen = torch.Generator().manual_seed(0)
    store.append(torch.randn(B, HKV, n, D, generator=gen) + 0.5, torch.randn(B, HKV, n, D, generator=gen))
    return store


def _append_kv():  # a prefill handing a rotated index its queries
    k = torch.randn(B, HKV, 5, D)
    return (torch.empty(0), torch.empty(0), k, torch.randn_like(k), None, 0, "opcheck",
            Options(sink_size=S, window_size=W, retriever="rotated").to_op_string(), torch.randn(B, H, 5, D))


def _split_attention():
    past, k = torch.empty(0), torch.randn(B, HKV, 300, D)
    handle = torch.ops.kvpass.append_kv(past, past, k, k + 1, None, 0, "opcheck",
                                        Options(sink_size=S, window_size=W).to_op_string())
    return (torch.randn(B, H, 1, D), handle, None, D ** -0.5, "topk", 0, "opcheck")  # the defaults: sketch


def _decode_step_args(capacity: bool):
    store = _store()
    st = ex.store_state(store)
    if capacity:
        st = ex.with_capacity([st], 4)[0]
    return (torch.randn(B, H, 1, D), torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D), *st.values(),
            store.index.proj("cpu").float(), logp_table(10, 150, 2), torch.tensor(store.length), S, W, 10, 2,
            "sample", 1 / math.sqrt(D), 256)


def _lsh_attention():
    store, idx = _store(), None
    idx = store.index
    return (torch.randn(B, H, 2, D), idx.proj("cpu"), idx.mu, store.host.k_blocks, store.host.v_blocks,
            store.options.host_block_size, store.host.length, idx.seg_ids, idx.seg_starts,
            torch.tensor(idx.seg_meta, dtype=torch.long).reshape(-1, 2), idx.tail, idx.tail_base, idx.tail_len,
            10, 2, "sample", 1, 0.25, store.static_k, store.static_v,
            torch.ones(2, S + W, dtype=torch.bool))


def _segments():
    codes = torch.randint(0, 16, (B, HKV, 300, 6), dtype=torch.int32)
    a = torch.ops.kvpass_cpu.lsh_build_segment(codes[:, :, :100], 4)
    b = torch.ops.kvpass_cpu.lsh_build_segment(codes[:, :, 100:], 4)
    return (*a, 100, *b, 200)


CASES = {
    "kvpass::append_kv": _append_kv,
    "kvpass::split_attention": _split_attention,
    "kvpass::decode_step": lambda: _decode_step_args(False),
    "kvpass::decode_step_capacity": lambda: _decode_step_args(True),
    "kvpass_cpu::lsh_attention": _lsh_attention,
    "kvpass_cpu::lsh_build_segment": lambda: (torch.randint(0, 32, (B, HKV, 70, 5), dtype=torch.int32), 5),
    "kvpass_cpu::lsh_merge_segments": _segments,
    "kvpass_cpu::log_retrieval_probability": lambda: (torch.linspace(-1, 1, 33, dtype=torch.float64), 10, 150, 2),
    "kvpass_cpu::sign_codes": lambda: (torch.randn(3, 4, 40), 10),
    "kvpass_cpu::simd_level": lambda: (),
}


def _registered() -> set[str]:
    load()
    return {n for n in torch._C._dispatch_get_all_op_names() if n.startswith(("kvpass::", "kvpass_cpu::"))}


def test_every_registered_op_is_checked():
    assert _registered() == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name, monkeypatch):
    load()  # the kvpass_cpu ops exist once the kernel is loaded (also when this test runs alone)
    ns, op = name.split("::")
    overload = getattr(getattr(torch.ops, ns), op).default
    if name == "kvpass::append_kv":  # its output, the store's handle, is NaN by design (a placeholder read
        # outside kvpass must not look plausible): eager and AOT outputs are compared with NaN == NaN
        monkeypatch.setattr(torch.testing, "assert_close",
                            functools.partial(torch.testing.assert_close, equal_nan=True))
    torch.library.opcheck(overload, CASES[name]())
