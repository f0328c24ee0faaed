"""The LSH kernel (retrieve → score → softmax → V) against the plain-torch definition of each estimator."""

import math
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvpass.cpu_ops import (
    loader,
    log_retrieval_probability,
    lsh_build_segment,
    lsh_merge_segments,
    sign_codes,
)
from kvpass.lowering.attention import softcapped_attention
from kvpass.lowering.reference import (
    estimator_scores,
    hash_codes,
    logp_table,
    lsh_candidates,
    pack_bits,
    reference_attention,
    simhash,
    sketch_codes,
    sketch_scale,
    sketch_scores,
    stride_offsets,
)
from kvpass.runtime.lsh import projection, sketch_tiles

import kvpass
from kvpass import KVStore
from kvpass.testing import fuzz_examples


def _store(Hkv, D, dtype, chunks, *, K, L, T, min_keys, seal, B=1, S=2, W=3, seed=0, block=64, tail=0):
    store = KVStore(Hkv, D, batch=B, sink_size=S, window_size=W, lsh_k=K, lsh_l=L, lsh_threshold=T, seed=seed, retriever="lsh",
                    dtype=dtype, host_block_size=block, tail_stride=tail)
    store.index.min_keys, store.index.seal_size = min_keys, seal
    gen = torch.Generator().manual_seed(seed)
    for n in chunks:
        k = torch.randn(B, Hkv, n, D, generator=gen) + 0.5  # a common direction, as real keys have
        store.append(k, torch.randn(B, Hkv, n, D, generator=gen))
    return store


def _reference(store, q, estimator, budget, softcap=0.0):
    ks, vs = store.host.views()
    k, v = torch.cat(ks, 2), torch.cat(vs, 2)
    idx = store.index
    kw = {}
    if idx.built and estimator in ("sample", "topk"):
        # the kernel hashes q itself; its codes equal torch's except where q·R rounds across 0
        agree = (store.last_query_codes == idx.query_codes(q)).float().mean().item()
        assert agree > 0.99
        kw = {"q_codes": store.last_query_codes, "k_codes": idx.codes(k), "mu": idx.mu}
    elif estimator in ("sample", "topk"):  # no index yet: every key is read
        estimator = "exact"
    r, n = store.options.tail_stride, k.shape[2]
    if r and estimator in ("topk", "oracle") and store.resolve_budget(budget) < n:  # the store's tail sample
        kw.update(stride=r, offset=stride_offsets(store.options.seed, store.site, store.length, q.shape[0],
                                                  store.num_kv_heads, r))
    return reference_attention(q, k, v, 1 / math.sqrt(q.shape[-1]), estimator, lsh_k=idx.lsh_k, lsh_l=idx.lsh_l,
                               threshold=idx.threshold, budget=store.resolve_budget(budget), softcap=softcap, **kw)


@settings(max_examples=fuzz_examples(60), deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 4]), Tq=st.integers(1, 3),
       D=st.sampled_from([8, 16, 64]), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       chunks=st.lists(st.integers(1, 90), min_size=1, max_size=5), estimator=st.sampled_from(["sample", "topk", "oracle"]),
       budget=st.one_of(st.integers(1, 40), st.floats(0.01, 1.0)), seal=st.sampled_from([16, 37, 4096]),
       seed=st.integers(0, 5), T=st.integers(1, 3), softcap=st.sampled_from([0.0, 0.0, 1.5]),
       tail=st.sampled_from([0, 0, 5]))
def test_kernel_matches_the_torch_definition(B, Hkv, G, Tq, D, dtype, chunks, estimator, budget, seal, seed, T,
                                             softcap, tail):
    """Threshold 1-2 takes the kernel's bitset path, 3 its counter path; softcap > 0 caps the scores; topk
    and oracle with or without a tail sample."""
    store = _store(Hkv, D, dtype, chunks, K=4, L=12, T=T, min_keys=20, seal=seal, B=B, seed=seed, tail=tail)
    q = torch.randn(B, Hkv * G, Tq, D, generator=torch.Generator().manual_seed(seed + 100))
    if store.tokens_offloaded == 0:
        out, lse = store.attend_host(q, estimator=estimator, budget=budget)
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
        return
    out, lse = store.attend_host(q, estimator=estimator, budget=budget, softcap=softcap)
    ref_out, ref_lse, ref_read = _reference(store, q, estimator, budget, softcap)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-4, atol=1e-5)
    assert not torch.isnan(out).any()
    if store.index.built:
        assert store.last_keys_read == pytest.approx(ref_read.float().mean().item())


@settings(max_examples=fuzz_examples(25), deadline=None)
@given(G=st.sampled_from([1, 3]), Tq=st.integers(1, 4), n=st.integers(1, 200),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), estimator=st.sampled_from(["exact", "oracle"]),
       softcap=st.sampled_from([0.0, 0.7]))
def test_attend_is_dense_causal_attention_over_every_token(G, Tq, n, dtype, estimator, softcap):
    """KVStore.attend with an estimator that reads every key (fused static + host pass on CPU) equals
    dense attention over all stored tokens, causal inside the query block — soft-capped or not."""
    Tq = min(Tq, n)
    store = _store(2, 16, dtype, [n], K=4, L=8, T=2, min_keys=10 ** 9, seal=4096, B=2)
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(2, 2 * G, Tq, 16, generator=gen)
    out = store.attend(q, estimator=estimator, budget=1.0, softcap=softcap)
    gen = torch.Generator().manual_seed(0)  # _store's keys, regenerated
    k = torch.randn(2, 2, n, 16, generator=gen) + 0.5
    v = torch.randn(2, 2, n, 16, generator=gen)
    k, v = k.to(dtype).float(), v.to(dtype).float()
    mask = torch.arange(n)[None, :] <= torch.arange(n - Tq, n)[:, None]
    if softcap:
        ref = softcapped_attention(q, k, v, attn_mask=mask, enable_gqa=True, softcap=softcap)
    else:
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_bucket_tables_hold_every_key_once_per_table():
    codes = torch.randint(0, 16, (2, 3, 1000, 5), dtype=torch.int32)
    ids, starts = lsh_build_segment(codes, 4)
    w = (1000 - 1).bit_length()
    assert ids.shape == (2, 3, 5, (1000 * w + 7) // 8 + 4) and starts.shape == (2, 3, 5, 16)
    raw = ids[1, 2, 3].numpy()
    bits = int.from_bytes(raw.tobytes(), "little")
    order = [(bits >> (i * w)) & ((1 << w) - 1) for i in range(1000)]
    assert sorted(order) == list(range(1000))
    st_ = starts[1, 2, 3].int().tolist() + [1000]
    for c in range(16):
        members = order[st_[c]:st_[c + 1]]
        assert members == sorted(members) and all(codes[1, 2, m, 3] == c for m in members)


def test_merged_segments_equal_one_built_from_all_codes():
    codes = torch.randint(0, 32, (1, 2, 300, 6), dtype=torch.int32)
    a = lsh_build_segment(codes[:, :, :100], 5)
    b = lsh_build_segment(codes[:, :, 100:], 5)
    merged = lsh_merge_segments(*a, 100, *b, 200)
    whole = lsh_build_segment(codes, 5)
    assert torch.equal(merged[0], whole[0]) and torch.equal(merged[1], whole[1])


def test_retrieval_probability_is_finite_and_monotone():
    cos = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    lp = log_retrieval_probability(cos, 10, 150, 2)
    assert torch.isfinite(lp).all() and (lp <= 0).all()
    assert (lp[1:] >= lp[:-1] - 1e-12).all()
    # against the textbook formula where it does not cancel
    p = (1 - torch.arccos(cos[1500]) / math.pi) ** 10
    P = 1 - (1 - p) ** 150 - 150 * p * (1 - p) ** 149
    assert lp[1500].item() == pytest.approx(math.log(P), rel=1e-9)


def test_sample_is_consistent_over_random_projections():
    """Averaged over many independent projections (seeds), the sample estimator's Σ e^s v and Σ e^s
    approach the true sums over the offloaded keys.  Seeded; the tolerance is set from the spread of
    the per-seed estimates (5 standard errors), and the seed-average must also be far closer to the
    truth than the keys-read fraction alone would explain."""
    torch.manual_seed(0)
    D, n = 32, 3000
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(1, 1, n, D, generator=gen)
    v = torch.randn(1, 1, n, D, generator=gen)
    q = (k[:, :, 123:124] * 1.5 + 0.3 * torch.randn(1, 1, 1, D, generator=gen))  # a query with a few clear hits
    scale = 1 / math.sqrt(D)
    s = (q[0, 0, 0] @ k[0, 0].T) * scale
    true_z = torch.exp(s).sum().item()
    true_num = (torch.exp(s)[:, None] * v[0, 0]).sum(0)
    zs, nums, reads = [], [], []
    for seed in range(200):
        store = KVStore(1, D, batch=1, sink_size=0, window_size=1, lsh_k=6, lsh_l=40, lsh_threshold=2, seed=seed, retriever="lsh")
        store.append(torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2))  # the last token stays static
        out, lse = store.attend_host(q, estimator="sample", scale=scale)
        z = math.exp(lse.item())
        zs.append(z)
        nums.append(out[0, 0, 0] * z)
        reads.append(store.last_keys_read / n)
    zs, nums = torch.tensor(zs), torch.stack(nums)
    se_z = zs.std().item() / math.sqrt(len(zs))
    assert abs(zs.mean().item() - true_z) <= 5 * se_z, (zs.mean().item(), true_z, se_z)
    se_num = nums.std(0) / math.sqrt(len(nums))
    assert ((nums.mean(0) - true_num).abs() <= 5 * se_num + 1e-6).all()
    assert 0 < sum(reads) / len(reads) < 0.5  # it really sampled


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None or
                    not Path("/proc/self/maps").exists(), reason="inspects an x86-64 ELF build with objdump")
@pytest.mark.skipif(loader.sanitize(), reason="inspects the optimised build, not the sanitizer build")
def test_built_kernel_keeps_its_row_prefetches_and_inlined_lambdas():
    """Guards two build regressions that cost 2x speed silently: GCC dropping the K/V row prefetches (a
    loop of nothing but __builtin_prefetch is "side-effect free"), and a per-row lambda outlined out of
    the SIMD clones (compiled for the baseline ISA).  Every clone of every per-row function must prefetch,
    and no lambda of the row template may exist as a function of its own."""
    loader.load()
    so = next(line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
              if "kvpass_cpu_" in line and line.endswith(".so"))
    asm = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", so], capture_output=True, text=True,
                         check=True).stdout
    prefetches: dict[str, int] = {}
    fn = ""
    for line in asm.splitlines():
        if line.endswith(">:"):
            fn = line[line.index("<") + 1:-2]
            if "::row_" in fn and ".resolver" not in fn and "@plt" not in fn:  # each SIMD clone
                prefetches.setdefault(fn, 0)
        elif "prefetcht0" in line and fn in prefetches:
            prefetches[fn] += 1
    assert len(prefetches) >= 3, f"no per-row functions found in {so}"
    assert all(n > 0 for n in prefetches.values()), prefetches
    assert not [f for f in re.findall(r"<([^>]*row<[^>]*lambda[^>]*)>:", asm)], "a per-row lambda was outlined"


@pytest.mark.parametrize("Hkv", [1, 3])
@pytest.mark.parametrize("K,L", [(10, 150), (7, 37), (16, 5), (3, 50)])
def test_query_codes_hashed_in_table_chunks_equal_torch(K, L, Hkv):
    """With fewer (batch row, kv head) units than threads, or a count the threads do not divide (1 or 3
    kv heads on 2 threads), the kernel hashes queries in chunks of tables — several here, the last one
    partial for L = 150 / 37 / 50 — and every table's code must still be torch's (up to q·R rounding
    across 0)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        store = _store(Hkv, 64, torch.bfloat16, [600], K=K, L=L, T=2, min_keys=20, seal=4096)
        q = torch.randn(1, 3 * Hkv, 2, 64, generator=torch.Generator().manual_seed(7))
        store.attend(q, estimator="sample")
    finally:
        torch.set_num_threads(threads)
    agree = (store.last_query_codes == store.index.query_codes(q)).float().mean().item()
    assert agree > 0.995, agree


@pytest.mark.parametrize("K,L", [(10, 150), (1, 3), (16, 5), (7, 37)])
def test_sign_codes_are_the_torch_packing(K, L):
    """The C++ bit packing used on the CPU gives the exportable torch packing's codes, zeros (+0 and -0:
    bit 0) and NaN (bit 0) included; simhash on the CPU equals hash_codes of the same centred keys."""
    gen = torch.Generator().manual_seed(K * 100 + L)
    y = torch.randn(2, 3, 33, K * L, generator=gen)
    y[0, 0, :5] = 0.0
    y[0, 1, :5] = -0.0
    y[1, 2, 3, ::3] = float("nan")
    assert torch.equal(sign_codes(y, K), pack_bits(y, K))
    x = torch.randn(2, 3, 70, 16, generator=gen)
    mu = torch.randn(2, 3, 16, generator=gen)
    proj = projection(0, "t", 3, 16, K, L, "cpu")
    assert torch.equal(simhash(x, mu, proj, K), hash_codes(x - mu[:, :, None], proj.float(), K))  # same GEMM
    with pytest.raises(RuntimeError, match="multiple of lsh_k"):
        sign_codes(torch.zeros(4, 17), 16)


def attend_topk(store: KVStore, q: torch.Tensor, budget, scan: str, softcap: float = 0.0):
    """store.attend_host(q, "topk") with the sketch scanned by the kernel's native path (AVX512-VNNI or AVX2,
    what the CPU has), its AVX2 path (where the CPU has AVX2) or its portable loop ($KVPASS_SKETCH_SCAN,
    restored after)."""
    old = os.environ.pop("KVPASS_SKETCH_SCAN", None)
    try:
        if scan in ("portable", "avx2"):
            os.environ["KVPASS_SKETCH_SCAN"] = scan
        return store.attend_host(q, estimator="topk", budget=budget, softcap=softcap)
    finally:
        os.environ.pop("KVPASS_SKETCH_SCAN", None)
        if old is not None:
            os.environ["KVPASS_SKETCH_SCAN"] = old


@settings(max_examples=fuzz_examples(40), deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 4, 7]), Tq=st.integers(1, 3),
       D=st.sampled_from([6, 8, 20, 64]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       chunks=st.lists(st.integers(1, 90), min_size=1, max_size=5), budget=st.integers(1, 40),
       seed=st.integers(0, 5), scan=st.sampled_from(["native", "avx2", "portable"]),
       bits=st.sampled_from([8, 4, "rotated"]), softcap=st.sampled_from([0.0, 2.0]))
def test_sketch_retriever_matches_the_torch_definition(B, Hkv, G, Tq, D, dtype, chunks, budget, seed, scan, bits,
                                                       softcap):
    """topk over the sketch's `budget` best keys, int8 or int4 codes, or the rotated sketch's (int4 codes of
    the rotated keys, coded at the first step).  The sketch scores are integers (the quantised query dotted
    with the codes), exact in any order, so the kernel — its VNNI path where the CPU has one, its AVX2 path and
    the portable loop — and torch pick the same candidates (ties by key order in both), for any query."""
    retriever = "rotated" if bits == "rotated" else "sketch"
    bits = 4 if bits == "rotated" else bits
    store = KVStore(Hkv, D, batch=B, sink_size=2, window_size=3, estimator="topk", retriever=retriever, tail_stride=0,
                    dtype=dtype, host_block_size=64, sketch_bits=bits)
    store.index.min_keys = 20
    gen = torch.Generator().manual_seed(seed)
    for n in chunks:
        store.append(torch.randn(B, Hkv, n, D, generator=gen) * 3 + 0.5, torch.randn(B, Hkv, n, D, generator=gen))
    q = torch.randn(B, Hkv * G, Tq, D, generator=gen) * 2
    idx = store.index
    if store.tokens_offloaded == 0:
        return
    ks, vs = store.host.views()
    k, v = torch.cat(ks, 2), torch.cat(vs, 2)
    out, lse = attend_topk(store, q, budget, scan, softcap)
    sketch = idx.reference_sketch(k) if idx.built else None
    if retriever == "sketch" and idx.built:  # the store's codes are the definition's
        assert torch.equal(sketch[0], sketch_codes(k, idx.mu, idx.sketch_scale, bits))
    ref_out, ref_lse, ref_read = reference_attention(q, k, v, 1 / math.sqrt(D), "topk" if idx.built else "exact",
                                                     mu=idx.mu, budget=store.resolve_budget(budget), sketch=sketch,
                                                     softcap=softcap)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-5)
    if idx.built:
        assert store.last_scored.tolist() == ref_read.tolist()  # min(n, budget) per row
        assert idx.index_bytes >= k.shape[2] * B * Hkv * D * bits // 8  # a code per key and dimension


@pytest.mark.parametrize("bits", [8, 4])
def test_sketch_codes_saturate_and_rank_like_the_keys(bits):
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 500, 32, generator=gen)
    mu = keys.mean(2)
    scale = sketch_scale(keys, mu, bits)
    codes = sketch_codes(keys, mu, scale, bits)
    lv = 127 if bits == 8 else 7
    assert codes.dtype == torch.int8 and codes.abs().max() == lv
    assert sketch_codes(keys * 10, mu, scale, bits).abs().max() == lv  # beyond the build range: saturated
    q = torch.randn(1, 2, 1, 1, 32, generator=gen)
    exact = (q @ keys.transpose(-1, -2)[:, :, None])[..., 0, :]
    approx = sketch_scores(q, codes, scale)[..., 0, :]
    top = exact.topk(5, -1).indices
    assert approx.topk(10 if bits == 8 else 25, -1).indices.unsqueeze(-1).eq(top.unsqueeze(-2)).any(-2).all()


def test_int4_tiles_pack_two_codes_a_byte():
    """The int4 layout: byte e of word g holds dimension 8g + e (low nibble) and 8g + 4 + e (high), each as
    code + 8; dimensions past D count as code 0."""
    codes = torch.tensor([[[[-7, -1, 0, 1, 2, 3, 6, 7, 5, -5]]]], dtype=torch.int8)  # D = 10
    t = sketch_tiles(codes, 4).view(torch.uint8)
    assert t.shape == (1, 1, 1, 2, 4)
    assert t[0, 0, 0, 0].tolist() == [(-7 + 8) | (2 + 8) << 4, 7 | (3 + 8) << 4, 8 | (6 + 8) << 4, 9 | (7 + 8) << 4]
    assert t[0, 0, 0, 1].tolist() == [(5 + 8) | 8 << 4, (-5 + 8) | 8 << 4, 8 | 8 << 4, 8 | 8 << 4]
    assert torch.equal(sketch_tiles(codes, 8)[0, 0, 0].flatten()[:10], codes.flatten())


def test_sample_is_refused_with_the_sketch_retriever():
    with pytest.raises(ValueError, match="retriever='sketch' goes with estimator='topk'"):
        KVStore(2, 8, retriever="sketch", estimator="sample")
    assert kvpass.Options(estimator="sample").index == "lsh" and kvpass.Options().index == "sketch"  # "auto"
    store = KVStore(2, 8)  # the defaults: topk over the sketch
    store.append(torch.randn(1, 2, 400, 8), torch.randn(1, 2, 400, 8))
    with pytest.raises(ValueError, match="needs the LSH index"):
        store.attend_host(torch.randn(1, 2, 1, 8), estimator="sample")


@pytest.mark.parametrize("bits", [8, 4])
def test_sketch_blocks_hold_every_key_across_blocks_and_appends(bits):
    """Bulk and one-token appends over three sketch blocks: the blocks hold exactly ``sketch_codes`` of the
    host keys, laid out by ``sketch_tiles`` (tiles undone), and the kernel still matches the definition."""
    from kvpass.runtime.lsh import SKETCH_BLOCK

    B, Hkv, D = 1, 2, 16
    store = KVStore(Hkv, D, batch=B, sink_size=2, window_size=3, estimator="topk", retriever="sketch", tail_stride=0,
                    sketch_bits=bits)
    gen = torch.Generator().manual_seed(3)
    for n in (5000, *[1] * 37, 3000, 7, 1500):
        store.append(torch.randn(B, Hkv, n, D, generator=gen), torch.randn(B, Hkv, n, D, generator=gen))
    idx = store.index
    k = torch.cat(store.host.views()[0], 2)
    v = torch.cat(store.host.views()[1], 2)
    n = k.shape[2]
    assert len(idx.sketch_blocks) == -(-n // SKETCH_BLOCK) == 3
    codes = sketch_codes(k, idx.mu, idx.sketch_scale, bits)
    # [.., tiles, words, 16 keys, 4 bytes] back to [.., keys, words, 4]
    stored = torch.cat([b.transpose(3, 4).reshape(B, Hkv, SKETCH_BLOCK, *b.shape[3:4], 4) for b in idx.sketch_blocks],
                       2)[:, :, :n]
    assert torch.equal(stored, sketch_tiles(codes, bits))
    q = torch.randn(B, 2 * Hkv, 1, D, generator=gen)
    out, lse = store.attend_host(q, estimator="topk", budget=50)
    ref_out, ref_lse, _ = reference_attention(q, k, v, D ** -0.5, "topk", mu=idx.mu, budget=50,
                                              sketch=(codes, idx.sketch_scale))
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("budget", [40, 3000])
@pytest.mark.parametrize("units", ["key chunks", "one per kv head"])
def test_sketch_selection_is_exact_when_the_sample_misleads(budget, units):
    """The kernel picks its threshold from a sample: at this size the first 16 scores of every 256.  High
    scores at exactly those positions mislead it whenever the budget exceeds them (3000 > 1024): the exact
    fallback must then give the same keys as the definition, ties by key order included (the low scores
    tie a lot); below that (40) the threshold keeps a superset and the exact choice decides.  Both ways
    the kernel splits the scan: one kv head over all threads (key chunks, every score stored), and a kv
    head per thread (each scanned by one thread, the keys above the threshold listed as they are scored)."""
    B, D, n = 1, 8, 16384
    Hkv = 1 if units == "key chunks" or torch.get_num_threads() == 1 else min(torch.get_num_threads(), 8)
    store = KVStore(Hkv, D, batch=B, sink_size=0, window_size=1, estimator="topk", retriever="sketch", tail_stride=0,
                    sketch_bits=8)  # the codes below are int8
    gen = torch.Generator().manual_seed(5)
    store.append(torch.randn(B, Hkv, n + 1, D, generator=gen), torch.randn(B, Hkv, n + 1, D, generator=gen))
    idx = store.index
    k, v = torch.cat(store.host.views()[0], 2), torch.cat(store.host.views()[1], 2)
    assert k.shape[2] == n
    codes = torch.randint(-3, 4, (B, Hkv, n, D), generator=gen, dtype=torch.int8)
    sampled = torch.arange(n) % 256 < 16
    codes[:, :, sampled] = (50 + torch.arange(n)[sampled] % 7).to(torch.int8)[None, None, :, None]
    idx.sketch_scale = torch.ones_like(idx.sketch_scale)
    idx.sketch_store = idx._new_sketch()
    idx._add_sketch(codes)
    q = torch.ones(B, Hkv, 1, D)
    out, lse = store.attend_host(q, estimator="topk", budget=budget)
    ref_out, ref_lse, _ = reference_attention(q, k, v, D ** -0.5, "topk", mu=idx.mu, budget=budget,
                                              sketch=(codes, idx.sketch_scale))
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-5)


def test_a_long_query_block_is_split_into_chunks_with_the_same_result(monkeypatch):
    """The sketch kernel holds a score per query row and key; a block of queries beyond SKETCH_SCORES is
    attended in chunks (static part causal per row), with the same result as in one call."""
    from kvpass.runtime import store as store_mod

    gen = torch.Generator().manual_seed(2)
    store = KVStore(2, 16, batch=1, sink_size=2, window_size=8)  # the defaults: topk over the sketch
    store.append(torch.randn(1, 2, 600, 16, generator=gen), torch.randn(1, 2, 600, 16, generator=gen))
    q = torch.randn(1, 4, 7, 16, generator=gen)
    whole = store.attend(q)
    monkeypatch.setattr(store_mod, "SKETCH_SCORES", 4 * 590 * 2)  # 2 query rows per call
    torch.testing.assert_close(store.attend(q), whole)
    assert store.last_scored.shape == (1, 4, 7)


@settings(max_examples=fuzz_examples(12), deadline=None)
@given(G=st.sampled_from([1, 4, 7]), Tq=st.integers(1, 2), D=st.sampled_from([8, 64]), bits=st.sampled_from([8, 4]),
       budget=st.sampled_from([1, 37, 400, 2000]), extra=st.integers(0, 700), seed=st.integers(0, 3),
       scan=st.sampled_from(["native", "avx2", "portable"]), rotated=st.booleans())
def test_sketch_listed_scan_matches_the_torch_definition(G, Tq, D, bits, budget, extra, seed, scan, rotated):
    """From 16,384 offloaded keys on, a kv head scanned by one thread lists only the keys whose sketch score
    reaches a sampled threshold, with their scores, and picks the budget best from the list: the same keys
    as the definition (any budget, both code widths, GQA groups of 1-7 rows, a partial last tile)."""
    threads = torch.get_num_threads()
    Hkv = min(threads, 8) if threads > 1 else 2  # a kv head per thread: the units are scanned one by one
    n = 16384 + extra
    bits = 4 if rotated else bits
    store = KVStore(Hkv, D, batch=1, sink_size=2, window_size=3, estimator="topk", tail_stride=0,
                    retriever="rotated" if rotated else "sketch", sketch_bits=bits)
    gen = torch.Generator().manual_seed(seed)
    store.append(torch.randn(1, Hkv, n + 5, D, generator=gen) * 3 + 0.5, torch.randn(1, Hkv, n + 5, D, generator=gen))
    q = torch.randn(1, Hkv * G, Tq, D, generator=gen) * 2
    idx = store.index
    k, v = torch.cat(store.host.views()[0], 2), torch.cat(store.host.views()[1], 2)
    out, lse = attend_topk(store, q, budget, scan)
    sketch = idx.reference_sketch(k)
    ref_out, ref_lse, ref_read = reference_attention(q, k, v, 1 / math.sqrt(D), "topk", mu=idx.mu, budget=budget,
                                                     sketch=sketch)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-5)
    assert store.last_scored.tolist() == ref_read.tolist()


@settings(max_examples=fuzz_examples(30), deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), G=st.sampled_from([1, 3, 4]), Tq=st.integers(1, 2),
       n=st.integers(30, 400), how=st.sampled_from(["sketch", "sketch+tail", "rotated+tail", "lsh sample",
                                                   "lsh topk+tail", "exact"]),
       threads=st.integers(1, 3), seed=st.integers(0, 5))
def test_the_kernel_counts_the_bytes_it_reads(B, Hkv, G, Tq, n, how, threads, seed):
    """What a step reads, counted by the kernel per (batch row, kv head): the sketch's bytes (once per tile
    of 16 keys below the sampled-threshold size), and the distinct keys whose K row and whose V row some
    query row of the kv head read — the torch definition's union over the group's rows of the keys each
    estimator scores (K) and attends (V); the sketch, LSH sampling and exact read both rows of the same
    keys, topk over LSH candidates scores them all and reads V for the kept.  Whichever way the rows are
    spread over the threads (one unit a thread, or rows of one kv head on several)."""
    retriever, estimator = how.split("+")[0].split(" ")[0], how.split("+")[0].split(" ")[-1]
    retriever = "sketch" if how == "exact" else retriever
    estimator = "topk" if retriever in ("sketch", "rotated") and estimator == retriever else estimator
    stride = 7 if "tail" in how else 0
    store = KVStore(Hkv, 16, batch=B, sink_size=2, window_size=3, estimator="topk", retriever=retriever,
                    tail_stride=stride, host_block_size=64, lsh_k=4, lsh_l=12, lsh_threshold=2, seed=seed)
    store.index.min_keys = 20
    store.cpu_threads = threads
    gen = torch.Generator().manual_seed(seed)
    store.append(torch.randn(B, Hkv, n, 16, generator=gen) * 2 + 0.5, torch.randn(B, Hkv, n, 16, generator=gen))
    q = torch.randn(B, Hkv * G, Tq, 16, generator=gen)
    budget = 9
    store.attend_host(q, estimator=estimator, budget=budget)
    reads = store.last_reads
    ks, _ = store.host.views()
    k, idx, m = torch.cat(ks, 2), store.index, store.host.length
    qg = q.reshape(B, Hkv, G, Tq, 16)
    kw = {"mu": idx.mu, "budget": store.resolve_budget(budget), "threshold": idx.threshold}
    r, offset = store.tail_sample(estimator, kw["budget"], m)
    if r:
        kw.update(stride=r, offset=offset)
    if retriever in ("sketch", "rotated") and estimator == "topk":
        kw["sketch"] = idx.reference_sketch(k)
    elif retriever == "lsh":
        codes = (store.last_query_codes.reshape(B, Hkv, G, Tq, -1), idx.codes(k))
        kw.update(q_codes=codes[0], k_codes=codes[1], logp=logp_table(idx.lsh_k, idx.lsh_l, idx.threshold))
    s, _ = estimator_scores(qg, k, 0.25, "oracle" if estimator == "exact" else estimator,
                            **({} if estimator == "exact" else kw))
    v_keys = s > float("-inf")
    k_keys = v_keys
    if how == "lsh topk+tail":  # every candidate scored, the kept ones' V read
        k_keys = v_keys | lsh_candidates(*codes, idx.threshold)
    union = (lambda keys: keys.any(2).any(2).sum(-1))  # [B, Hkv]: over the group's rows and positions
    assert reads[..., 1].tolist() == union(k_keys).tolist()
    assert reads[..., 2].tolist() == union(v_keys).tolist()
    words = 16 * idx.sketch_bits // 32
    scanned = -(-m // 16) * 64 * words if estimator == "topk" and retriever != "lsh" else 0
    assert reads[..., 0].tolist() == [[scanned] * Hkv] * B
    got = store.last_step_reads
    assert got["row_bytes"] == int(reads[..., 1:].sum()) * 16 * 4 and got["dense_bytes"] == 2 * B * Hkv * m * 16 * 4
