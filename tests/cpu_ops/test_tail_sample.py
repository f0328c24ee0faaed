"""The head + tail estimator (``tail_stride``): the kept keys (the head) counted exactly, every r-th other
offloaded key added with weight r — the kernel against its plain-torch definition, its unbiasedness, and
the per-step offsets."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvpass.lowering.attention import softmax_lse
from kvpass.lowering.reference import (
    estimator_scores,
    logp_table,
    sketch_codes,
    stride_offsets,
    tail_sample,
)
from kvpass.runtime import store as store_mod

from kvpass import KVStore
from kvpass.testing import fuzz_examples


def _filled(B, Hkv, D, n, *, seed=0, **options):
    store = KVStore(Hkv, D, batch=B, sink_size=2, window_size=3, host_block_size=64, **options)
    store.index.min_keys = 20
    gen = torch.Generator().manual_seed(seed)
    store.append(torch.randn(B, Hkv, n, D, generator=gen) * 2 + 0.5, torch.randn(B, Hkv, n, D, generator=gen))
    return store, gen


def _definition(store, q, estimator, budget, stride, offset):
    """(out, lse, scored, kept) of the head + tail estimator over the store's host keys, in plain torch."""
    idx = store.index
    k, v = (torch.cat(x, 2).float() for x in store.host.views())
    B, H, Tq, D = q.shape
    Hkv = store.num_kv_heads
    qg = q.float().reshape(B, Hkv, H // Hkv, Tq, D)
    kw = {}
    if estimator == "topk" and idx.sketch:
        kw["sketch"] = (sketch_codes(k, idx.mu, idx.sketch_scale, idx.sketch_bits), idx.sketch_scale)
    elif estimator == "topk":
        kw.update(q_codes=store.last_query_codes.reshape(B, Hkv, H // Hkv, Tq, -1), k_codes=idx.codes(k),
                  threshold=idx.threshold, logp=logp_table(idx.lsh_k, idx.lsh_l, idx.threshold))
    s, scored = estimator_scores(qg, k, D ** -0.5, estimator, budget=budget, stride=stride, offset=offset, **kw)
    out, lse = softmax_lse(s, v)
    shape = (B, H, Tq)
    return out.reshape(B, H, Tq, D), lse.reshape(shape), scored.reshape(shape), torch.isfinite(s).sum(-1).reshape(shape)


@settings(max_examples=fuzz_examples(50), deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), G=st.sampled_from([1, 3, 7]), Tq=st.integers(1, 2),
       D=st.sampled_from([8, 32]), n=st.integers(30, 400), budget=st.integers(1, 60), stride=st.integers(1, 9),
       kind=st.sampled_from(["sketch", "lsh1", "lsh2", "lsh3", "oracle"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 5))
def test_the_kernels_tail_sample_matches_its_definition(B, Hkv, G, Tq, D, n, budget, stride, kind, dtype, seed):
    """Head from the sketch, from LSH candidates (threshold 1-2: the bitset path, keys in key order; 3: the
    counter path, keys in the order met) or from all keys (oracle); the tail skips the head's keys; the
    offsets are the store's own (``stride_offsets`` at its length)."""
    estimator = "oracle" if kind == "oracle" else "topk"
    opts = {"retriever": "sketch"} if kind in ("sketch", "oracle") else \
        {"retriever": "lsh", "lsh_k": 4, "lsh_l": 12, "lsh_threshold": int(kind[-1])}
    store, gen = _filled(B, Hkv, D, n, seed=seed, dtype=dtype, estimator=estimator, budget=budget,
                         tail_stride=stride, **opts)
    q = torch.randn(B, Hkv * G, Tq, D, generator=gen) * 2
    out, lse = store.attend_host(q)
    n_host = store.tokens_offloaded
    if not store.index.built or min(budget, n_host) >= n_host:  # every key, exactly: no tail
        return
    offset = stride_offsets(0, store.site, store.length, B, Hkv, stride)
    ref_out, ref_lse, ref_scored, ref_kept = _definition(store, q, estimator, min(budget, n_host), stride, offset)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-5)
    assert store.last_scored.tolist() == ref_scored.tolist()
    assert store.last_kept.tolist() == ref_kept.tolist()
    assert bool((store.last_kept <= min(budget, n_host) + -(-n_host // stride)).all())


@pytest.mark.parametrize("estimator,retriever", [("topk", "sketch"), ("topk", "lsh"), ("oracle", "sketch")])
@pytest.mark.parametrize("stride", [3, 16])
def test_over_all_offsets_the_tail_sums_are_exact(monkeypatch, estimator, retriever, stride):
    """The estimator's unbiasedness, exactly: averaged over the stride's offsets, the estimated softmax
    denominator Σ exp(s) and numerator Σ exp(s)·v equal the exact ones — each key outside the head is in
    exactly one offset's sample, with weight stride; the head's keys in none (never counted twice)."""
    store, gen = _filled(1, 2, 16, 700, estimator=estimator, retriever=retriever, budget=0.05, tail_stride=stride,
                         lsh_k=4, lsh_l=12)
    q = torch.randn(1, 6, 1, 16, generator=gen) * 2
    ex_out, ex_lse = store.attend_host(q, estimator="exact")
    den, num = torch.zeros_like(ex_lse, dtype=torch.float64), torch.zeros_like(ex_out, dtype=torch.float64)
    shift = ex_lse.double()[..., None]
    for off in range(stride):
        monkeypatch.setattr(store_mod, "stride_offsets", lambda *a, off=off: torch.full((1, 2), off))
        out, lse = store.attend_host(q)
        w = torch.exp(lse.double()[..., None] - shift)  # Σ exp(s) of this offset, over the exact sum
        den += w[..., 0] / stride
        num += w * out.double() / stride
    torch.testing.assert_close(den, torch.ones_like(den), rtol=1e-5, atol=0)
    torch.testing.assert_close(num, ex_out.double(), rtol=1e-4, atol=1e-5)
    assert bool((store.last_kept > store.resolve_budget(None)).all())  # the tail was attended


def test_the_offsets_are_uniform_and_a_recomputed_step_draws_the_same_keys():
    """Seeded: over 20,000 decode positions each offset in [0, 16) is drawn with frequency 1/16 (chi-square,
    15 degrees of freedom, p > 1e-4), one for all of a site's rows and kv heads; the same (seed, site,
    position) gives the same offset, another site or position (mostly) another one."""
    r = 16
    draws = torch.stack([stride_offsets(0, "model.layers.3.self_attn", p, 2, 4, r) for p in range(20000)])
    assert draws.min() >= 0 and draws.max() < r
    assert bool((draws == draws[:, :1, :1]).all())  # one draw per step and site, for every row and kv head
    draws = draws[:, 0, 0]
    counts = torch.bincount(draws, minlength=r).double()
    expected = draws.numel() / r
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 44.3  # the 1 - 1e-4 quantile of chi-square(15)
    a = stride_offsets(7, "s", 1234, 2, 4, r)
    assert torch.equal(a, stride_offsets(7, "s", 1234, 2, 4, r))
    assert not torch.equal(a, stride_offsets(7, "s", 1235, 2, 4, r)) or not torch.equal(a, stride_offsets(7, "t", 1234, 2, 4, r))
    tail = tail_sample(40, 8, torch.tensor([[3]]))
    assert tail.shape == (1, 1, 1, 1, 40) and tail.flatten().nonzero().flatten().tolist() == [3, 11, 19, 27, 35]


def test_the_tail_sample_is_refused_where_it_means_nothing():
    with pytest.raises(ValueError, match="tail_stride must be an int >= 0"):
        KVStore(2, 16, tail_stride=-1)
    with pytest.raises(ValueError, match="tail sample goes with estimator 'topk' or 'oracle'"):
        estimator_scores(torch.randn(1, 1, 1, 1, 4), torch.randn(1, 1, 5, 4), 0.5, "sample", stride=2,
                         offset=torch.zeros(1, 1))
    store, gen = _filled(1, 2, 16, 300, estimator="sample", retriever="lsh", tail_stride=4)
    store.attend_host(torch.randn(1, 2, 1, 16, generator=gen))  # sample: the tail knob does not apply
    assert bool((store.last_kept == store.last_scored).all())
    with pytest.raises(RuntimeError, match="goes with 'topk' or 'oracle'"):
        torch.ops.kvpass_cpu.lsh_attention(
            torch.randn(1, 2, 1, 16), store.index.proj("cpu"), store.index.mu, store.host.k_blocks,
            store.host.v_blocks, 64, store.host.length, store.index.seg_ids, store.index.seg_starts,
            torch.tensor(store.index.seg_meta, dtype=torch.long).reshape(-1, 2), store.index.tail,
            store.index.tail_base, store.index.tail_len, 10, 2, "sample", 1, 0.25, stride=4,
            stride_offset=torch.zeros(1, 2, dtype=torch.long))
