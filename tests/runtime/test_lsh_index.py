"""The SimHash index's memory: at most 2 bytes per token per table (the reference layout: 4)."""

import torch

from kvpass import KVStore


def test_index_is_at_most_two_bytes_per_token_per_table_at_32k():
    Hkv, D, n = 2, 64, 32768
    gen = torch.Generator().manual_seed(0)
    store = KVStore(Hkv, D, batch=1, lsh_k=10, lsh_l=150, dtype=torch.bfloat16)
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
