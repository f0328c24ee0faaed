"""The Triton static-KV kernel (both variants) against the torch reference, under TRITON_INTERPRET=1 on
CPU (set by tests/conftest.py; on a CUDA machine the same tests run the compiled kernel on the GPU)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvpass.lowering import merge_partials, static_attention

triton_static = pytest.importorskip("kvpass.lowering.triton_static")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ring(S, W, filled, Hkv, B, D, dtype, gen):
    """Static slots as KVStore lays them out: sinks, then a W-slot ring that may have wrapped."""
    n = S + W
    k = torch.randn(B, Hkv, n, D, generator=gen).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, n, D, generator=gen).to(DEVICE, dtype)
    pos = torch.full((n,), -1, dtype=torch.long)
    length = filled
    for p in range(min(S, length)):
        pos[p] = p
    for p in range(max(S, length - W), length):
        pos[S + (p - S) % W] = p
    return k, v, pos.to(DEVICE), length


@settings(max_examples=30, deadline=None)
@given(G=st.sampled_from([1, 2, 4, 8]), Hkv=st.integers(1, 2), B=st.integers(1, 2), Tq=st.integers(1, 8),
       D=st.sampled_from([16, 64, 80, 96, 128, 256]), S=st.integers(0, 4), W=st.sampled_from([8, 13]),
       extra=st.integers(-6, 40), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       fuse=st.booleans(), seed=st.integers(0, 100), softcap=st.sampled_from([0.0, 0.0, 0.8]))
def test_kernel_matches_the_reference(G, Hkv, B, Tq, D, S, W, extra, dtype, fuse, seed, softcap):
    """Window partly filled (extra < 0), exactly full (0) and wrapped around the ring (> 0); scores
    soft-capped where softcap > 0."""
    gen = torch.Generator().manual_seed(seed)
    filled = max(Tq, S + W + extra)
    k, v, pos, length = _ring(S, W, filled, Hkv, B, D, dtype, gen)
    q = torch.randn(B, Hkv * G, Tq, D, generator=gen).to(DEVICE, dtype)
    q_pos = torch.arange(length - Tq, length, device=DEVICE)
    scale = D ** -0.5
    ref_out, ref_lse = static_attention(q, k, v, pos, q_pos, scale, softcap=softcap)
    kw = {"softcap": softcap}
    if fuse:  # a CPU partial to merge in (lse -inf somewhere: nothing offloaded for that row)
        o_d = torch.randn(B, Hkv * G, Tq, D, generator=gen).to(DEVICE)
        l_d = torch.randn(B, Hkv * G, Tq, generator=gen).to(DEVICE) * 3
        l_d[..., 0] = float("-inf")
        ref_out, ref_lse = merge_partials(ref_out, ref_lse, o_d, l_d)
        kw.update(out_d=o_d, lse_d=l_d)
    out, lse = triton_static.static_attention_triton(q, k, v, pos, q_pos, scale, **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("D", [64, 96, 128, 256])
def test_head_dims_of_real_models(D):
    gen = torch.Generator().manual_seed(D)
    k, v, pos, length = _ring(4, 64, 200, 2, 1, D, torch.bfloat16, gen)
    q = torch.randn(1, 8, 1, D, generator=gen).to(DEVICE, torch.bfloat16)
    q_pos = torch.tensor([length - 1], device=DEVICE)
    out, lse = triton_static.static_attention_triton(q, k, v, pos, q_pos, D ** -0.5)
    ref_out, ref_lse = static_attention(q, k, v, pos, q_pos, D ** -0.5)
    torch.testing.assert_close(out, ref_out, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)


def test_kvstore_attend_with_the_triton_backend():
    from kvpass import KVStore

    gen = torch.Generator().manual_seed(0)
    outs = {}
    for backend in ("triton", "torch"):
        store = KVStore(2, 32, batch=1, sink_size=4, window_size=16, static_backend=backend, device=DEVICE)
        k, v = torch.randn(1, 2, 500, 32, generator=gen), torch.randn(1, 2, 500, 32, generator=gen)
        store.append(k.to(DEVICE), v.to(DEVICE))
        q = torch.randn(1, 6, 2, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        outs[backend] = store.attend(q, estimator="exact")
        gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-5, atol=1e-5)


def test_compiled_model_with_the_triton_static_part(monkeypatch):
    """The rewritten graph with static_backend="triton": the Triton kernel (fused merge) runs every
    decode step of a tiny Llama and the tokens equal dense attention's."""
    import kvpass
    from kvpass.testing import compile_kvpass, greedy, tiny_model

    calls = []
    kernel = triton_static.static_attention_triton
    monkeypatch.setattr(triton_static, "static_attention_triton", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 60), generator=torch.Generator().manual_seed(2))
    ref_ids, ref_logits = greedy(model, ids, 5)
    compile_kvpass(model, window_size=8, estimator="exact", static_backend="triton")
    got_ids, logits = greedy(model, ids, 5)
    assert torch.equal(got_ids, ref_ids) and (logits - ref_logits).abs().max() <= 1e-4
    assert kvpass.runtime_stats()["tokens_offloaded"] == 2 * (60 + 4 - 4 - 8)
    assert len(calls) == 2 * 4  # every decode step of both layers


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is for CPU machines")
def test_gpu_check_script_runs_in_smoke_mode():
    """benchmarks/gpu_check.py's kernel table, on the CPU (interpreter): it must not rot between GPU runs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    rows = gpu_check.check_kernel(torch.device("cpu"), smoke=True)
    assert rows and all(float(err) < 1e-5 for _, err, _, _ in rows)


@pytest.mark.parametrize("fuse", [False, True])
def test_autotuned_launcher_runs_every_tile_and_matches(fuse):
    """The CUDA launcher autotunes the tile from TUNE_CONFIGS.  Triton times candidates with CUDA events,
    so here a stand-in timer runs each candidate in the interpreter (every tile must give the reference's
    answer) and picks the last one."""
    gen = torch.Generator().manual_seed(0)
    B, Hkv, G, Tq, D, S, W = 1, 2, 4, 2, 64, 4, 24
    k, v, pos, length = _ring(S, W, S + W + 9, Hkv, B, D, torch.float32, gen)
    q = torch.randn(B, Hkv * G, Tq, D, generator=gen).to(DEVICE)
    q_pos = torch.arange(length - Tq, length, device=DEVICE)
    o_d = torch.randn(B, Hkv * G, Tq, D, generator=gen).to(DEVICE) if fuse else None
    l_d = torch.randn(B, Hkv * G, Tq, generator=gen).to(DEVICE) if fuse else None
    ref_o, ref_l = static_attention(q, k, v, pos, q_pos, D ** -0.5)
    if fuse:
        ref_o, ref_l = merge_partials(ref_o, ref_l, o_d, l_d)
    timed = []

    def bench(kernel_call, quantiles=None):
        kernel_call()
        timed.append(len(timed))
        return [10.0 - len(timed)] * 3

    tuned = triton_static.make_tuned(do_bench=bench)
    out, lse = triton_static.static_attention_triton(q, k, v, pos, q_pos, D ** -0.5, o_d, l_d, tune=True,
                                                     _tuned=tuned)
    expected = triton_static._prune(triton_static.TUNE_CONFIGS, {}, BLOCK_R=G * Tq, BLOCK_D=D)
    assert len(timed) == len(expected) >= 2
    assert tuned.best_config is expected[-1]
    torch.testing.assert_close(out, ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_l, rtol=1e-5, atol=1e-5)
