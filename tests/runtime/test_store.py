"""The per-(sequence, site) store: every token in exactly one place, accounting honest."""

import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvpass.runtime import KVStore
from kvpass.runtime.blocks import host_empty


def _contents(store: KVStore):
    """(positions, k) of every token the store holds, sorted by position."""
    ks, _ = store.host.views()
    host_k = torch.cat(ks, 2) if ks else torch.empty(store.batch, store.num_kv_heads, 0, store.head_dim)
    S = store.sink_size
    host_pos = torch.arange(S, S + host_k.shape[2])
    valid = store.static_pos >= 0
    pos = torch.cat([host_pos, store.static_pos[valid]])
    k = torch.cat([host_k, store.static_k[:, :, valid]], 2)
    order = pos.argsort()
    return pos[order], k[:, :, order]


@settings(max_examples=60, deadline=None)
@given(S=st.integers(0, 5), W=st.integers(1, 9), chunks=st.lists(st.integers(1, 30), min_size=1, max_size=8),
       block=st.sampled_from([1, 3, 16, 4096]))
def test_every_token_stored_exactly_once(S, W, chunks, block):
    torch.manual_seed(0)
    store = KVStore(3, 4, batch=2, dtype=torch.float32, device="cpu", sink_size=S, window_size=W, host_block_size=block)
    full = torch.randn(2, 3, sum(chunks), 4)
    t = 0
    for n in chunks:
        store.append(full[:, :, t:t + n], full[:, :, t:t + n] * 2)
        t += n
        assert torch.equal(store.last_positions, torch.arange(t - n, t))
    pos, k = _contents(store)
    assert torch.equal(pos, torch.arange(t))  # each position once
    assert torch.equal(k, full)
    assert store.tokens_offloaded == max(0, t - S - W)
    assert store.host_bytes == 2 * store.tokens_offloaded * 2 * 3 * 4 * 4
    assert store.device_bytes == 2 * 2 * 3 * (S + W) * 4 * 4  # independent of t


def test_host_store_keeps_its_dtype_and_bf16():
    store = KVStore(1, 8, batch=1, dtype=torch.bfloat16, device="cpu", sink_size=1, window_size=2)
    store.append(torch.randn(1, 1, 10, 8), torch.randn(1, 1, 10, 8))
    ks, _ = store.host.views()
    assert ks[0].dtype == torch.bfloat16 and ks[0].shape[2] == 7


@settings(max_examples=60, deadline=None)
@given(S=st.integers(0, 4), W=st.integers(1, 8),
       ops=st.lists(st.tuples(st.integers(1, 20), st.integers(0, 12)), min_size=1, max_size=10))
def test_crops_forget_exactly_the_dropped_tokens(S, W, ops):
    """Appends of n tokens, each followed by a crop of up to m of the newest (a rejected draft): the store
    holds exactly the surviving tokens, each once, with the host store cut back where the crop reaches it."""
    torch.manual_seed(0)
    store = KVStore(2, 4, batch=2, sink_size=S, window_size=W, host_block_size=8)
    kept = torch.empty(2, 2, 0, 4)
    for n, m in ops:
        new = torch.randn(2, 2, n, 4)
        store.append(new, new * 2)
        kept = torch.cat([kept, new], 2)
        m = min(m, kept.shape[2])
        store.crop(kept.shape[2] - m)
        kept = kept[:, :, :kept.shape[2] - m]
        pos, k = _contents(store)
        assert torch.equal(pos, torch.arange(kept.shape[2])) and torch.equal(k, kept)
        assert store.index.n_keys == store.tokens_offloaded


def _decode(store, full, t0, t1):
    for t in range(t0, t1):
        store.append(full[:, :, t:t + 1], -full[:, :, t:t + 1])


@pytest.mark.parametrize("estimator,retriever", [("exact", "sketch"), ("topk", "sketch"), ("sample", "lsh")])
def test_reorder_equals_a_store_of_the_reordered_rows(estimator, retriever):
    """Beam search's reorder (rows may repeat): every estimator then gives what a store built from the
    reordered rows gives — static slots, host KV, the sketch or the LSH segments and tail all follow."""
    torch.manual_seed(0)
    B, Hkv, D, n = 3, 2, 16, 1200
    full = torch.randn(B, Hkv, n + 30, D)
    rows = torch.tensor([2, 0, 0])
    kw = {"batch": B, "sink_size": 2, "window_size": 8, "estimator": estimator, "retriever": retriever, "budget": 0.05}
    store, ref = KVStore(Hkv, D, **kw), KVStore(Hkv, D, **kw)
    store.append(full[:, :, :n], -full[:, :, :n])  # a prompt (sealed at once), then decode steps (the tail)
    _decode(store, full, n, n + 20)
    store.reorder(rows)
    ref.append(full[rows, :, :n], -full[rows, :, :n])
    _decode(ref, full[rows], n, n + 20)
    _decode(store, full, n + 20, n + 30)
    _decode(ref, full, n + 20, n + 30)
    assert store.reorders == 1 and ref.reorders == 0
    q = torch.randn(B, 4, 1, D)
    torch.testing.assert_close(store.attend(q), ref.attend(q), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("estimator,retriever", [("topk", "sketch"), ("sample", "lsh")])
def test_crop_then_new_tokens_equals_never_having_seen_the_draft(estimator, retriever):
    torch.manual_seed(0)
    B, Hkv, D, n = 1, 2, 16, 1200
    full, draft = torch.randn(B, Hkv, n + 40, D), torch.randn(B, Hkv, 12, D)
    kw = {"batch": B, "sink_size": 2, "window_size": 8, "estimator": estimator, "retriever": retriever, "budget": 0.05}
    store, ref = KVStore(Hkv, D, **kw), KVStore(Hkv, D, **kw)
    for s in (store, ref):
        s.append(full[:, :, :n], -full[:, :, :n])
        _decode(s, full, n, n + 20)
    store.append(draft, -draft)  # 12 draft tokens, 4 of them pushed to the host at once; all rejected
    store.crop(n + 20)
    for s in (store, ref):
        s.append(full[:, :, n + 20:n + 25], -full[:, :, n + 20:n + 25])  # a verify block, accepted
        _decode(s, full, n + 25, n + 40)
    q = torch.randn(B, 4, 1, D)
    torch.testing.assert_close(store.attend(q), ref.attend(q), rtol=1e-6, atol=1e-6)


def test_crop_into_a_sealed_lsh_segment_is_refused():
    store = KVStore(1, 16, batch=1, sink_size=2, window_size=8, estimator="sample", retriever="lsh")
    store.append(torch.randn(1, 1, 1200, 16), torch.randn(1, 1, 1200, 16))  # sealed at once
    with pytest.raises(ValueError, match="sealed .* bucket segment"):
        store.crop(1100)
    store.crop(1195)  # inside the window: fine
    assert store.length == 1195


@pytest.mark.parametrize("retriever,estimator", [("lsh", "sample"), ("sketch", "topk")])
def test_a_padded_rows_index_is_centred_on_its_own_keys(retriever, estimator):
    """Row 1 holds row 0's first 1,200 keys after 300 padding keys far from them (as an eos token's are):
    the first padded step rebuilds the index with each row's μ (and sketch scale) over its own keys, not
    a centre the padding pulled away (on SmolLM2 that skew made the most padded row read 1.42x the keys
    it reads alone: tests/models/test_smollm2.py)."""
    torch.manual_seed(0)
    Hkv, D, n, pad = 2, 32, 1500, 300
    k0, v0 = torch.randn(1, Hkv, n, D) + 0.5, torch.randn(1, Hkv, n, D)
    k = torch.cat([k0, torch.cat([torch.full((1, Hkv, pad, D), 6.0), k0[:, :, :n - pad]], 2)])
    v = torch.cat([v0, torch.cat([torch.zeros(1, Hkv, pad, D), v0[:, :, :n - pad]], 2)])
    store = KVStore(Hkv, D, batch=2, sink_size=4, window_size=16, retriever=retriever, estimator=estimator)
    store.append(k, v)
    q = torch.randn(1, 2 * Hkv, 1, D).expand(2, -1, -1, -1) * 2
    store.attend(q, row_pad=torch.tensor([0, pad]))
    mu = store.index.mu
    torch.testing.assert_close(mu[1], k0[0, :, :n - pad - 16].mean(1))  # row 1's own host keys (from position pad)
    torch.testing.assert_close(mu[0], k0[0, :, 4:n - 16].mean(1))


@pytest.mark.parametrize("estimator,retriever,n,B,Hkv", [
    ("exact", "sketch", 1500, 2, 2), ("oracle", "sketch", 1500, 2, 2), ("sample", "lsh", 1500, 2, 2),
    ("none", "sketch", 1500, 2, 2),
    ("topk", "sketch", 1500, 2, 2),    # one thread per (row, kv head), every score stored
    ("topk", "sketch", 20000, 2, 2),   # the listed scan (a sampled threshold)
    ("topk", "sketch", 1500, 1, 3),    # 3 units on 2 threads: the scan split in key chunks
    ("topk", "rotated", 1500, 2, 2)])  # fitted and coded with each row's own keys
def test_left_padding_is_never_attended(estimator, retriever, n, B, Hkv):
    """The last row's first 300 positions are padding whose keys point along the query (they would take
    all the attention) and whose values are 1000: with row_pad no estimator attends or counts them —
    sinks included — exact equals dense attention over the real keys, topk keeps its budget of the row's
    own keys, and the other rows are unchanged."""
    from kvpass.lowering import dense_attention_with_lse

    torch.manual_seed(0)
    H, D, pad, S, W = 2 * Hkv, 16, 300, 2, 8
    k, v = torch.randn(B, Hkv, n, D), torch.randn(B, Hkv, n, D)
    q = torch.randn(B, H, 1, D)
    qdir = q[-1, ::2, 0, None]
    k[-1, :, :pad] = 30 * qdir / qdir.norm(dim=-1, keepdim=True)
    v[-1, :, :pad] = 1000.0
    store = KVStore(Hkv, D, batch=B, sink_size=S, window_size=W, estimator=estimator, retriever=retriever,
                    budget=0.05, cpu_threads=2)
    store.append(k, v)
    row_pad = torch.zeros(B, dtype=torch.long)
    row_pad[-1] = pad
    out = store.attend(q, row_pad=row_pad)
    scored = store.last_scored
    assert out[-1].abs().max() < 50  # no padding value reached the output
    assert torch.equal(out[:-1], store.attend(q)[:-1])
    own = n - W - pad  # the last row's real host keys
    if estimator == "exact":
        allowed = torch.arange(n)[None, :] >= row_pad[:, None]  # [B, n]
        ref, _ = dense_attention_with_lse(q, k, v, 1 / D**0.5, allowed[:, None, None, None, :])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert bool((scored[0] == n - S - W).all()) and bool((scored[-1] == own).all())  # real keys only
        torch.testing.assert_close(store._attend_padded(q, "exact", None, 1 / D**0.5, row_pad), ref,
                                   rtol=1e-5, atol=1e-5)  # the accelerator's path: the same
    if estimator == "topk":  # the budget is the row's share of its own keys, all of them real; the tail
        # sample (every 100th of the others) counts from the row's first real key
        head = round(0.05 * own)
        assert bool((scored[-1] > head).all()) and bool((scored[-1] <= head + -(-own // 100)).all())


@settings(max_examples=40, deadline=None)
@given(block=st.sampled_from([8, 64, 100, 4096]), sketch_bits=st.sampled_from([4, 8]),
       ops=st.lists(st.tuples(st.sampled_from(["append", "crop", "reorder", "fork"]), st.integers(0, 7),
                              st.integers(1, 300)), min_size=1, max_size=14))
def test_forks_are_independent_stores_that_share_the_prefix(block, sketch_bits, ops):
    """A tree of forks under appends, crops (below a fork point too) and beam reorders: every store
    holds exactly its own tokens and attends (sketch top-k) exactly as a store that replayed its own
    history without forks — whatever its parent or siblings wrote after the fork (copy on write)."""
    torch.manual_seed(0)
    B, Hkv, D = 2, 2, 16
    kw = {"batch": B, "sink_size": 2, "window_size": 8, "host_block_size": block, "budget": 0.1,
          "sketch_bits": sketch_bits}
    root = KVStore(Hkv, D, **kw)
    root.append(*(2 * [torch.randn(B, Hkv, 600, D)]))
    stores, history = [root], [[("append", _contents(root)[1])]]
    for op, which, n in ops:
        i = which % len(stores)
        s = stores[i]
        if op == "append":
            new = torch.randn(B, Hkv, n, D)
            s.append(new, new)
            history[i].append(("append", new))
        elif op == "crop":
            m = max(0, s.length - n)
            if m > 0:
                s.crop(m)
                history[i].append(("crop", m))
        elif op == "reorder":
            rows = torch.tensor([1, 1]) if n % 2 else torch.tensor([1, 0])
            s.reorder(rows)
            history[i].append(("reorder", rows))
        else:
            stores.append(s.fork())
            history.append(list(history[i]))
    q = torch.randn(B, 4, 1, D)
    for s, hist in zip(stores, history):
        ref = KVStore(Hkv, D, **kw)
        for op, arg in hist:
            if op == "append":
                ref.append(arg, arg)
            elif op == "crop":
                ref.crop(arg)
            else:
                ref.reorder(arg)
        assert s.length == ref.length
        pos, k = _contents(s)
        pos_r, k_r = _contents(ref)
        assert torch.equal(pos, pos_r) and torch.equal(k, k_r)
        torch.testing.assert_close(s.attend(q), ref.attend(q), rtol=1e-6, atol=1e-6)


def test_the_kernel_refuses_block_starts_that_do_not_cover_the_keys():
    from kvpass.cpu_ops import lsh_attention

    store = KVStore(2, 16, batch=1, sink_size=2, window_size=8, host_block_size=80, estimator="exact")
    store.append(torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16))
    fork = store.fork()
    page, starts = fork.host.kernel_blocks()
    # 290 host tokens in blocks of 80: the fork's own block starts at its last page (of 16 tokens)
    assert page == 16 and starts.tolist() == [0, 80, 160, 240, 288]
    q = torch.randn(1, 4, 1, 16)
    args = (q, fork.index.proj(), fork.index.mu, fork.host.k_blocks, fork.host.v_blocks, page, 290, [], [],
            torch.zeros(0, 2, dtype=torch.long), fork.index.tail, 0, 0)
    kw = dict(lsh_k=fork.index.lsh_k, threshold=1, estimator="oracle", budget=290, scale=0.25)
    out, *_ = lsh_attention(*args, block_starts=starts, **kw)
    unforked = lsh_attention(q, *args[1:3], store.host.k_blocks, store.host.v_blocks, 80, *args[6:], **kw)[0]
    torch.testing.assert_close(out, unforked)
    for bad in ([0, 80, 160, 240, 280], [0, 80, 240, 160, 288], [16, 80, 160, 240, 288], [0, 80, 160, 320, 336]):
        with pytest.raises(RuntimeError, match="starts"):
            lsh_attention(*args, block_starts=torch.tensor(bad), **kw)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set from /proc")
def test_a_host_block_is_resident_only_where_written():
    """host_empty maps fresh pages: a 64 MiB block costs what is written of it, and goes back when it dies."""
    before = _rss_mib()
    t = host_empty((4, 1024, 4096), torch.float32)  # 64 MiB
    t[:, :2] = 1.0  # 4 x 2 rows of 16 KiB
    assert _rss_mib() - before < 4
    assert float(t[:, :2].sum()) == 4 * 2 * 4096 and t.shape == (4, 1024, 4096)
    t.fill_(2.0)
    assert _rss_mib() - before > 60
    del t
    assert _rss_mib() - before < 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set from /proc")
@pytest.mark.skipif(bool(os.environ.get("KVPASS_SANITIZE")), reason="under ASan freed memory waits in a quarantine: "
                    "the temporaries' pages are not reused, so RSS grows by them (scripts/sanitize.sh)")
def test_forks_cost_the_memory_of_their_own_tokens():
    """Each fork allocates a 4 MiB block of its own (block_size 4096, 2 kv heads, D 64, fp32), writes a page
    and a question into it, and decodes; between forks the model's temporaries come and go (here an 8 MiB
    tensor, written and freed).  On the malloc heap the forks' blocks would land on the temporaries'
    touched pages and cost 4 MiB each; on pages of their own they cost what they hold."""
    gen = torch.Generator().manual_seed(0)
    store = KVStore(2, 64, sink_size=4, window_size=16, host_block_size=4096, budget=0.05)
    store.append(torch.randn(1, 2, 3 * 4096 + 100, 64, generator=gen), torch.randn(1, 2, 3 * 4096 + 100, 64, generator=gen))
    store.attend(torch.randn(1, 8, 1, 64, generator=gen))
    forks, before = [], _rss_mib()
    for _ in range(8):
        torch.ones(2 << 20).sum()  # a temporary the size of two blocks, touched and freed
        forks.append(store.fork())
        for _ in range(20):  # a 16-token question and 4 answer tokens
            forks[-1].append(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
            forks[-1].attend(torch.randn(1, 8, 1, 64))
    assert _rss_mib() - before < 8 * 1.0
