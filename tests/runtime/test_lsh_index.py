"""The SimHash index's memory: at most 2 bytes per token per table (the reference layout: 4)."""

import pytest
import torch

from kvpass import KVStore


def test_index_is_at_most_two_bytes_per_token_per_table_at_32k():
    Hkv, D, n = 2, 64, 32768
    gen = torch.Generator().manual_seed(0)
    store = KVStore(Hkv, D, batch=1, lsh_k=10, lsh_l=150, dtype=torch.bfloat16, retriever="lsh")
    for chunk in torch.randn(1, Hkv, n, D, generator=gen).split(8192, dim=2):  # a chunked prefill
        store.append(chunk, chunk)
    stats = store.stats()
    tokens = stats["tokens_offloaded"]
    assert tokens == n - 4 - 64
    assert store.index.tail_base + store.index.tail_len == tokens  # every offloaded key is indexed
    assert stats["index_bytes"] <= 2 * 150 * tokens * Hkv, stats
    # and then decode: generated tokens are indexed too, through the tail and its sealed segments
    for _ in range(300):
        t = torch.randn(1, Hkv, 1, D, generator=gen)
        store.append(t, t)
    idx = store.index
    assert idx.tail_base + idx.tail_len == store.tokens_offloaded == tokens + 300
    q = torch.randn(1, 2 * Hkv, 1, D, generator=gen)
    assert torch.isfinite(store.attend(q)).all()


def test_a_prompt_is_sealed_at_once_and_the_layout_does_not_change_the_estimate():
    """A 2,000-token prompt is sealed into a bucket-table segment at once (left in the tail, its codes
    would be scanned whole at every decode step); sampling over it retrieves and weights exactly what
    the same keys give from the tail."""
    Hkv, D, n = 2, 64, 2068
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, Hkv, n, D, generator=gen), torch.randn(1, Hkv, n, D, generator=gen)
    k = k + 2.0 * torch.randn(1, Hkv, 1, D, generator=gen)  # a shared direction, as real keys have
    q = torch.randn(1, 4 * Hkv, 1, D, generator=gen) + k[:, :1, 1500:1501].repeat(1, 4 * Hkv, 1, 1)
    sealed = KVStore(Hkv, D, batch=1, dtype=torch.float32, retriever="lsh")
    sealed.append(k, v)
    assert sealed.index.tail_len == 0 and [m[1] for m in sealed.index.seg_meta] == [n - 4 - 64]
    tail = KVStore(Hkv, D, batch=1, dtype=torch.float32, retriever="lsh")
    tail.index.bulk_seal = tail.index.seal_size  # the former rule: < 4096 keys stay in the tail
    tail.append(k, v)
    assert tail.index.tail_len == n - 4 - 64 and not tail.index.seg_meta
    out_sealed = sealed.attend(q, estimator="sample")
    read = sealed.last_keys_read
    out_tail = tail.attend(q, estimator="sample")
    assert read == tail.last_keys_read > 0
    torch.testing.assert_close(out_sealed, out_tail, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_key_sketch_holds_one_code_per_key_dimension_and_no_hashing_state(bits):
    """retriever "sketch": an int8 or int4 code per key and dimension (in blocks of SKETCH_BLOCK keys), no
    bucket tables, and a SimHash projection of one table that is never read (not lsh_l tables) — all
    counted."""
    from kvpass.runtime.lsh import SKETCH_BLOCK

    Hkv, D, n = 2, 64, 5000
    gen = torch.Generator().manual_seed(0)
    store = KVStore(Hkv, D, batch=1, lsh_k=10, lsh_l=150, dtype=torch.bfloat16, sketch_bits=bits)  # topk, sketch
    k = torch.randn(1, Hkv, n, D, generator=gen)
    store.append(k, k)
    idx, stats = store.index, store.stats()
    assert idx.sketch and not idx.seg_ids and idx.tail_len == 0
    blocks, tiles = -(-stats["tokens_offloaded"] // SKETCH_BLOCK), -(-stats["tokens_offloaded"] // 16)
    assert len(idx.sketch_blocks) == blocks
    assert stats["index_bytes"] == tiles * 16 * Hkv * D * bits // 8 + 2 * Hkv * D * 4  # filled tiles, scale, mu
    assert stats["projection_bytes"] == idx.proj().nbytes == Hkv * D * 10 * 2
    q = torch.randn(1, 2 * Hkv, 1, D, generator=gen)
    assert torch.isfinite(store.attend(q)).all()
    head, n_host = store.resolve_budget(None), store.tokens_offloaded  # the budget, and the default tail sample
    assert bool((store.last_kept > head).all()) and bool((store.last_kept <= head + -(-n_host // 100)).all())
