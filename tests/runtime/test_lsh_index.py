"""The indexes of the offloaded keys: the SimHash index's memory (at most 2 bytes per token per table), the key
sketch, the rotated sketch's fit."""

import pytest
import torch

import kvpass
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


def test_the_rotated_index_is_coded_at_its_first_step_fitted_to_its_queries():
    """retriever "rotated": built with the keys (μ), coded at the first top-k step in the unit fitted to that
    step's queries (their mean q² per kv head), one step per kv head; later keys are coded with the frozen
    unit and step; a fork and a saved state carry the fit and answer alike."""
    from kvpass.lowering.reference import (
        ROTATED_STEP,
        rotated_coords,
        rotated_std,
        rotated_unit,
        site_rotation,
    )
    from kvpass.runtime.lsh import sketch_tiles

    Hkv, G, D = 2, 3, 16
    gen = torch.Generator().manual_seed(0)
    store = KVStore(Hkv, D, batch=1, sink_size=2, window_size=8, retriever="rotated", site="layers.0")
    k = torch.randn(1, Hkv, 600, D, generator=gen) * torch.linspace(0.1, 4, D)  # dimensions of unequal spread
    store.append(k, torch.randn(1, Hkv, 600, D, generator=gen))
    idx = store.index
    assert idx.built and not idx.coded and not idx.sketch_blocks
    q = torch.randn(1, Hkv * G, 1, D, generator=gen)
    store.attend_host(q, estimator="exact")  # reads every key: nothing to code for
    assert not idx.coded
    q = torch.randn(1, Hkv * G, 4, D, generator=gen) * torch.linspace(3, 0.2, D)
    store.attend_host(q, estimator="topk")
    assert idx.coded

    def host():
        return torch.cat(store.host.views()[0], 2)

    q_sq = q.reshape(1, Hkv, G * 4, D).pow(2).mean(2)
    torch.testing.assert_close(idx.q_sq, q_sq)
    unit = rotated_unit(rotated_std(host(), idx.mu), q_sq)
    torch.testing.assert_close(idx.unit, unit)
    rms = rotated_coords(host(), idx.mu, unit, site_rotation(0, "layers.0", D)).pow(2).mean((2, 3)).sqrt()
    torch.testing.assert_close(idx.sketch_scale, (ROTATED_STEP * rms)[..., None].expand(1, Hkv, D))

    def stored():  # the tiles of every host key, undone into [B, Hkv, n, words, 4]
        n = store.tokens_offloaded
        return torch.cat([b.transpose(3, 4).reshape(1, Hkv, -1, *b.shape[3:4], 4) for b in idx.sketch_blocks], 2)[:, :, :n]

    codes = idx.reference_sketch(host())[0]
    assert codes.min() >= -8 and codes.max() <= 7 and int(codes.min()) == -8  # the int4 code's 16 levels
    assert torch.equal(stored(), sketch_tiles(codes, 4))
    frozen = idx.unit.clone(), idx.sketch_scale.clone()
    for _ in range(3):  # later keys: coded with the frozen fit
        new = torch.randn(1, Hkv, 50, D, generator=gen) * 5
        store.append(new, new)
        store.attend_host(torch.randn(1, Hkv * G, 1, D, generator=gen), estimator="topk")
    assert torch.equal(idx.unit, frozen[0]) and torch.equal(idx.sketch_scale, frozen[1])
    assert torch.equal(stored(), sketch_tiles(idx.reference_sketch(host())[0], 4))
    q = torch.randn(1, Hkv * G, 1, D, generator=gen)
    want = store.attend(q)
    torch.testing.assert_close(store.fork().attend(q), want, rtol=0, atol=0)
    meta, tensors = store.state()
    torch.testing.assert_close(KVStore.from_state(meta, tensors).attend(q), want, rtol=0, atol=0)


def test_the_rotated_retriever_is_int4_top_k_only():
    with pytest.raises(ValueError, match="retriever='rotated' goes with estimator='topk'"):
        KVStore(2, 8, retriever="rotated", estimator="sample")
    with pytest.raises(ValueError, match="retriever='rotated' is an int4 code"):
        KVStore(2, 8, retriever="rotated", sketch_bits=8)
    assert kvpass.Options(retriever="rotated").index == "rotated"
