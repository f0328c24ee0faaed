"""The onnxruntime op library (cpu_ops/ort, ``onnx_lsh="custom"``): one ``kvpass.DecodeStep`` node in
onnxruntime against the plain-torch reference of the same step, in place and copying, and its errors."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvpass.cpu_ops import ort_library_path
from kvpass.lowering.decode_step import (
    _STEP_INPUTS,
    _STEP_OUTPUTS,
    decode_step_capacity_reference,
    register_onnx_schema,
)
from kvpass.lowering.reference import hash_codes, logp_table

from kvpass.testing import fuzz_examples

TYPES = {"codes": onnx.TensorProto.INT16, "position": onnx.TensorProto.INT64}
RANKS = {"mu": 3, "proj": 3, "logp": 1, "position": 0, "mu_out": 3}


def _session(estimator, S, W, K, T, scale, threads=1, min_keys=256):
    from onnx import helper

    register_onnx_schema()
    node = helper.make_node("DecodeStep", list(_STEP_INPUTS), list(_STEP_OUTPUTS), domain="kvpass", sink_size=S,
                            window_size=W, lsh_k=K, threshold=T, estimator=estimator, scale=scale, min_keys=min_keys)
    ins = [helper.make_tensor_value_info(n, TYPES.get(n, onnx.TensorProto.FLOAT),
                                         [f"{n}{i}" for i in range(RANKS.get(n, 4))]) for n in _STEP_INPUTS]
    outs = [helper.make_tensor_value_info(n, onnx.TensorProto.INT16 if n == "codes_out" else onnx.TensorProto.FLOAT,
                                          [f"{n}{i}" for i in range(RANKS.get(n, 4))]) for n in _STEP_OUTPUTS]
    model = helper.make_model(helper.make_graph([node], "step", ins, outs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("kvpass", 1)])
    onnx.checker.check_model(model)  # against the registered schema
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(ort_library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _state(B, H, Hkv, D, S, W, K, L, n, cap, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(B, Hkv, D, generator=g) * 0.3
    proj = torch.randn(Hkv, D, K * L, generator=g).bfloat16().float()
    hk = torch.randn(B, Hkv, cap, D, generator=g) + 0.5
    hk[:, :, n:] = 0  # free capacity
    hv = torch.randn(B, Hkv, cap, D, generator=g)
    hv[:, :, n:] = 0
    codes = hash_codes(hk - mu[:, :, None], proj, K).to(torch.int16)  # the capacity layout's dtype
    codes[:, :, n:] = 0
    return {"q": torch.randn(B, H, 1, D, generator=g) * 2, "k_new": torch.randn(B, Hkv, 1, D, generator=g),
            "v_new": torch.randn(B, Hkv, 1, D, generator=g), "static_k": torch.randn(B, Hkv, S + W, D, generator=g),
            "static_v": torch.randn(B, Hkv, S + W, D, generator=g), "host_k": hk, "host_v": hv, "codes": codes,
            "mu": mu, "proj": proj, "logp": logp_table(K, L, 2), "position": torch.tensor(S + W + n)}


@settings(max_examples=fuzz_examples(30), deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 4, 8]),
       D=st.sampled_from([16, 64, 80]), S=st.integers(0, 4), W=st.integers(1, 40), n=st.integers(0, 300),
       spare=st.integers(1, 5), estimator=st.sampled_from(["exact", "sample", "none"]), K=st.integers(6, 11),
       index=st.sampled_from(["built", "builds now", "not yet", "short context"]), seed=st.integers(0, 3))
def test_op_library_matches_reference(B, Hkv, group, D, S, W, n, spare, estimator, K, index, seed):
    """Every phase of a sequence: the ring not yet full (nothing offloaded, the unfilled slots not
    attended), fewer than min_keys host tokens (no index: every key read exactly, zero codes), the step
    that offloads the min_keys-th token (μ and every code built), and an index built before."""
    L, T = 24, 2
    state = _state(B, Hkv * group, Hkv, D, S, W, K, L, n, n + spare, seed=n + seed)
    min_keys = {"built": max(1, n), "builds now": n + 1, "not yet": n + 2, "short context": 256}[index]
    if index == "short context":  # position < S + W: nothing leaves the ring, no host row is written
        state["position"] = torch.tensor(n % (S + W))
    if index in ("builds now", "not yet", "short context"):  # the state of a store without an index
        state["codes"].zero_()
        state["mu"].zero_()
    scale = 1 / math.sqrt(D)
    ref = decode_step_capacity_reference(*state.values(), S, W, K, T, estimator, scale, min_keys)
    got = _session(estimator, S, W, K, T, scale, threads=2, min_keys=min_keys).run(
        None, {k: v.numpy() for k, v in state.items()})
    assert np.abs(got[0] - ref[0].numpy()).max() <= 1e-4 * max(1.0, float(ref[0].abs().max()))
    hashed = {"built": [n], "builds now": list(range(n + 1)), "not yet": [], "short context": []}[index]
    for name, g, r in zip(_STEP_OUTPUTS[1:], got[1:], ref[1:]):
        r = r.numpy()
        if name == "codes_out":  # hashed in C++ here, by a torch GEMM there (μ summed in another order)
            assert np.array_equal(np.delete(g, hashed, 2), np.delete(r, hashed, 2))
            if hashed:
                assert (g[:, :, hashed] != r[:, :, hashed]).mean() <= 0.05  # a sign flip of a ~0 projection
        elif name == "mu_out":
            assert np.abs(g - r).max() <= 1e-5, name
        else:
            assert np.array_equal(g, r), name
    if index == "short context":  # the host buffers are untouched
        assert np.array_equal(got[3], state["host_k"].numpy()) and np.array_equal(got[5], state["codes"].numpy())


def test_sample_reads_a_fraction_and_in_place_binding_writes_one_row():
    """Bound output = input buffer: the step writes the state in place (row N of the host buffers, one
    ring slot), and equals the copying run."""
    S, W, K, L, n, cap = 4, 32, 8, 50, 2000, 2004
    state = _state(1, 6, 2, 64, S, W, K, L, n, cap)
    sess = _session("sample", S, W, K, 2, 0.125)  # min_keys 256: the index is built
    feed = {k: v.numpy().copy() for k, v in state.items()}
    copied = sess.run(None, feed)
    binding = sess.io_binding()
    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()}
    binding.bind_output("out")
    for k, v in values.items():
        binding.bind_ortvalue_input(k, v)
        if f"{k}_out" in _STEP_OUTPUTS:
            binding.bind_ortvalue_output(f"{k}_out", v)
    before = {k: v.copy() for k, v in feed.items()}
    sess.run_with_iobinding(binding)
    assert np.array_equal(binding.get_outputs()[0].numpy(), copied[0])
    for name in ("static_k", "static_v", "host_k", "host_v", "codes"):
        now = values[name].numpy()
        assert np.array_equal(now, copied[_STEP_OUTPUTS.index(f"{name}_out")]), name
        changed = np.argwhere((now != before[name]).any(axis=(0, 1, 3)))[:, 0].tolist()
        expect = [n] if name in ("host_k", "host_v", "codes") else [S + (S + W + n - S) % W]
        assert changed == expect, name


def test_op_library_errors_are_clear():
    S, W, K, L, n = 2, 8, 8, 16, 40
    state = _state(1, 4, 2, 16, S, W, K, L, n, n + 1)
    feed = {k: v.numpy() for k, v in state.items()}
    sess = _session("exact", S, W, K, 2, 0.25)
    with pytest.raises(Exception, match="allocate more capacity"):
        sess.run(None, feed | {"position": np.array(S + W + n + 1)})
    with pytest.raises(Exception, match="position must be >= 0"):
        sess.run(None, feed | {"position": np.array(-1)})
    with pytest.raises(Exception, match="sink_size \\+ window_size"):
        sess.run(None, feed | {"static_k": feed["static_k"][:, :, 1:].copy()})
    with pytest.raises(Exception, match="same capacity"):
        sess.run(None, feed | {"host_v": feed["host_v"][:, :, 1:].copy()})
    with pytest.raises(Exception, match="multiple of kv heads"):
        sess.run(None, feed | {"q": np.zeros((1, 3, 1, 16), np.float32)})
    with pytest.raises(Exception, match="estimator must be"):
        _session("topk", S, W, K, 2, 0.25)
