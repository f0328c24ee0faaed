"""The per-(sequence, site) store: every token in exactly one place, accounting honest."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvpass.runtime import KVStore


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
