"""The C++/OpenMP host attention kernel against a plain-torch reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvpass.cpu_ops import host_attention
from kvpass.lowering import dense_attention_with_lse


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.sampled_from([1, 2, 4]), G=st.sampled_from([1, 2, 3, 8]), Tq=st.integers(1, 5),
       sizes=st.lists(st.integers(0, 300), min_size=0, max_size=4), D=st.sampled_from([16, 64, 80, 128]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**31 - 1))
def test_matches_reference(B, Hkv, G, Tq, sizes, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, Tq, D, generator=g)
    # blocks are views into larger buffers, as in the host store (non-contiguous batch/head strides)
    ks = [torch.randn(B, Hkv, n + 7, D, generator=g).to(dtype)[:, :, :n] for n in sizes]
    vs = [torch.randn(B, Hkv, n + 7, D, generator=g).to(dtype)[:, :, :n] for n in sizes]
    out, lse = host_attention(q, ks, vs, D ** -0.5)
    if sum(sizes) == 0:
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
        return
    k = torch.cat(ks, 2).float()
    v = torch.cat(vs, 2).float()
    ref_out, ref_lse = dense_attention_with_lse(q, k, v, D ** -0.5)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 4, 1, 16)
    k = torch.randn(1, 3, 5, 16)
    with pytest.raises(RuntimeError, match="not a multiple"):
        host_attention(q, [k], [k], 0.25)
    with pytest.raises(RuntimeError, match="float32"):
        host_attention(q.double(), [], [], 0.25)
    with pytest.raises(RuntimeError, match="not supported"):
        host_attention(q, [k[:, :2].double()], [k[:, :2].double()], 0.25)


def test_opcheck():
    q = torch.randn(1, 4, 2, 16)
    k = torch.randn(1, 2, 9, 16)
    torch.library.opcheck(torch.ops.kvpass_cpu.host_attention.default, (q, [k], [k], 0.25),
                          test_utils=("test_schema",))
