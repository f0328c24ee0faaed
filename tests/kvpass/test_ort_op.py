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
RANKS = {"mu": 3, "proj": 3, "logp": 1, "position": 0}


def _session(estimator, S, W, K, T, scale, threads=1):
    from onnx import helper

    register_onnx_schema()
    node = helper.make_node("DecodeStep", list(_STEP_INPUTS), list(_STEP_OUTPUTS), domain="kvpass", sink_size=S,
                            window_size=W, lsh_k=K, threshold=T, estimator=estimator, scale=scale)
    ins = [helper.make_tensor_value_info(n, TYPES.get(n, onnx.TensorProto.FLOAT),
                                         [f"{n}{i}" for i in range(RANKS.get(n, 4))]) for n in _STEP_INPUTS]
    outs = [helper.make_tensor_value_info(n, onnx.TensorProto.INT16 if n == "codes_out" else onnx.TensorProto.FLOAT,
                                          [f"{n}{i}" for i in range(4)]) for n in _STEP_OUTPUTS]
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


@settings(max_examples=fuzz_examples(25), deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 4, 8]),
       D=st.sampled_from([16, 64, 80]), S=st.integers(0, 4), W=st.integers(1, 40), n=st.integers(0, 300),
       spare=st.integers(1, 5), estimator=st.sampled_from(["exact", "sample", "none"]), K=st.integers(6, 11))
def test_op_library_matches_reference(B, Hkv, group, D, S, W, n, spare, estimator, K):
    L, T = 24, 2
    state = _state(B, Hkv * group, Hkv, D, S, W, K, L, n, n + spare, seed=n)
    scale = 1 / math.sqrt(D)
    ref = decode_step_capacity_reference(*state.values(), S, W, K, T, estimator, scale)
    got = _session(estimator, S, W, K, T, scale, threads=2).run(None, {k: v.numpy() for k, v in state.items()})
    assert np.abs(got[0] - ref[0].numpy()).max() <= 1e-4 * max(1.0, float(ref[0].abs().max()))
    for name, g, r in zip(_STEP_OUTPUTS[1:], got[1:], ref[1:]):
        if name == "codes_out":  # the new token's codes: hashed in C++ here, by a torch GEMM there
            r = r.numpy()
            assert np.array_equal(np.delete(g, n, 2), np.delete(r, n, 2))
            assert (g[:, :, n] != r[:, :, n]).mean() <= 0.05  # a sign flip of a ~0 projection is allowed
        else:
            assert np.array_equal(g, r.numpy()), name


def test_sample_reads_a_fraction_and_in_place_binding_writes_one_row():
    """Bound output = input buffer: the step writes the state in place (row N of the host buffers, one
    ring slot), and equals the copying run."""
    S, W, K, L, n, cap = 4, 32, 8, 50, 2000, 2004
    state = _state(1, 6, 2, 64, S, W, K, L, n, cap)
    sess = _session("sample", S, W, K, 2, 0.125)
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
    with pytest.raises(Exception, match="needs a full window"):
        sess.run(None, feed | {"position": np.array(S + W - 1)})
    with pytest.raises(Exception, match="sink_size \\+ window_size"):
        sess.run(None, feed | {"static_k": feed["static_k"][:, :, 1:].copy()})
    with pytest.raises(Exception, match="same capacity"):
        sess.run(None, feed | {"host_v": feed["host_v"][:, :, 1:].copy()})
    with pytest.raises(Exception, match="multiple of kv heads"):
        sess.run(None, feed | {"q": np.zeros((1, 3, 1, 16), np.float32)})
    with pytest.raises(Exception, match="estimator must be"):
        _session("topk", S, W, K, 2, 0.25)
