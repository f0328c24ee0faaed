"""Prefill once, ask many: ``copy.deepcopy`` of a cache that kvpass serves forks its stores, sharing the
prefix (Hugging Face's prompt-reuse pattern)."""

import copy

import pytest
import torch
from transformers import DynamicCache

import kvpass
from kvpass.runtime import REGISTRY
from kvpass.testing import cache_kwarg, compile_kvpass, tiny_model

CACHE = cache_kwarg()
GEN = torch.Generator().manual_seed(3)
PREFIX = torch.randint(3, 256, (1, 400), generator=GEN)
QUESTIONS = [torch.randint(3, 256, (1, n), generator=GEN) for n in (5, 9, 13)]


def _prefill(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{CACHE: cache})
    return cache


def _ask(model, cache, question, new=12):
    ids = torch.cat([PREFIX, question], 1)
    with torch.no_grad():
        out = model.generate(ids, **{CACHE: cache}, max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def _answers(model, prefix_cache):
    return [_ask(model, copy.deepcopy(prefix_cache), q) for q in QUESTIONS]


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: a hybrid cache (sliding-window + full layers)
def test_copies_of_a_prefilled_cache_answer_as_dense_in_exact_mode(family):
    model = tiny_model(family)
    dense = _answers(model, _prefill(model, PREFIX))
    compile_kvpass(model, window_size=16, sink_size=4, estimator="exact", host_block_size=128)
    kvpass.reset()
    prefix = _prefill(model, PREFIX)
    assert [a.tolist() for a in _answers(model, prefix)] == [a.tolist() for a in dense]


@pytest.mark.parametrize("options", [{}, {"retriever": "lsh", "estimator": "sample", "lsh_k": 4, "lsh_l": 20},
                                     {"retriever": "rotated"}], ids=["defaults", "magicpig", "rotated"])
def test_a_fork_answers_as_a_fresh_prefill_of_the_same_prefix(options):
    """Sampling modes: a fork decodes what a new sequence that prefilled the same prefix, then asked, would."""
    model = compile_kvpass(tiny_model("llama"), window_size=16, sink_size=4, host_block_size=128, **options)
    kvpass.reset()
    forked = _answers(model, _prefill(model, PREFIX))
    fresh = [_ask(model, _prefill(model, PREFIX), q) for q in QUESTIONS]
    assert [a.tolist() for a in forked] == [a.tolist() for a in fresh]


def test_forks_share_the_prefix_and_outlive_each_other():
    model = compile_kvpass(tiny_model("llama"), window_size=16, sink_size=4, host_block_size=128)
    kvpass.reset()
    prefix = _prefill(model, PREFIX)
    one = kvpass.runtime_stats()
    caches = [copy.deepcopy(prefix) for _ in range(8)]
    with torch.no_grad():  # each copy takes a question's first token: its stores fork
        for c, q in zip(caches, QUESTIONS * 3):
            model(q[:, :1], **{CACHE: c})
    eight = kvpass.runtime_stats()
    assert eight["sequences"] == 9
    # a fork holds only its own tokens: the fork point's page (64 tokens: here 380 host tokens, 60 past the
    # page) copied, and the token that left the window; the prefix is not there twice
    layers, host = 2, PREFIX.shape[1] - 4 - 16
    token = one["host_kv_bytes"] // (layers * host)
    assert eight["host_kv_bytes"] - one["host_kv_bytes"] == 8 * layers * (host % 64 + 1) * token
    # the index: the same page's sketch tiles (16 keys, int4: 2 kv heads x 16 dims / 2 B) and μ and the
    # sketch scale (2 kv heads x 16 dims, fp32)
    tiles = -(-(host % 64 + 1) // 16)
    assert eight["index_bytes"] - one["index_bytes"] == 8 * layers * (tiles * 16 * 16 + 2 * 2 * 16 * 4)
    trunk = [s for s in REGISTRY.stores() if s.length == PREFIX.shape[1]]
    forks = [s for s in REGISTRY.stores() if s.length == PREFIX.shape[1] + 1]
    assert len(trunk) == 2 and len(forks) == 16
    assert all(f.host.kv_blocks[0] is next(t for t in trunk if t.site == f.site).host.kv_blocks[0] for f in forks)
    # releasing the prefix and a fork leaves the other forks whole: they continue as a fresh run does
    ref = _ask(model, _prefill(model, PREFIX), QUESTIONS[1])
    assert kvpass.release(prefix) == 2 and kvpass.release(caches[0]) == 2
    cache = caches[1]
    with torch.no_grad():
        model(QUESTIONS[1][:, 1:], **{CACHE: cache})  # the rest of the question: this fork took its first token
        assert torch.equal(_continue(model, cache, ref.shape[1]), ref)


def _continue(model, cache, new):
    """Greedy tokens from a cache that has taken the whole prompt (the last logits recomputed by
    generate's usual path: feed the last prompt token again after cropping it)."""
    cache.crop(-1)
    ids = torch.cat([PREFIX, QUESTIONS[1]], 1)
    out = model.generate(ids, **{CACHE: cache}, max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def test_the_original_goes_on_and_a_copy_made_before_still_forks_at_the_prefix():
    """The original cache decodes on in place; a copy taken before that forks at the prefix (its store's
    later tokens cropped away in the fork only)."""
    model = compile_kvpass(tiny_model("llama"), window_size=16, sink_size=4, host_block_size=128,
                           estimator="exact")
    kvpass.reset()
    prefix = _prefill(model, PREFIX)
    saved = copy.deepcopy(prefix)
    first = _ask(model, prefix, QUESTIONS[0], new=30)  # the original itself: 30+ tokens past the prefix
    second = _ask(model, saved, QUESTIONS[1])
    assert torch.equal(second, _ask(model, _prefill(model, PREFIX), QUESTIONS[1]))
    assert torch.equal(first, _ask(model, _prefill(model, PREFIX), QUESTIONS[0], new=30))


def test_a_copy_whose_original_is_gone_is_a_clear_error():
    model = compile_kvpass(tiny_model("llama"), window_size=8, estimator="exact")
    kvpass.reset()
    prefix = _prefill(model, PREFIX[:, :40])
    saved = copy.deepcopy(prefix)
    kvpass.release(prefix)
    with torch.no_grad(), pytest.raises(Exception, match="keep the original cache alive"):
        model(QUESTIONS[0], **{CACHE: saved})


def test_a_copied_static_cache_is_adopted_and_answers_as_dense():
    """A StaticCache's buffers hold the model's real KV: a copy of one is a buffer kvpass has not seen, whose
    earlier tokens it adopts (offloads and indexes anew; nothing shared) — exact mode equals dense."""
    from transformers import StaticCache

    model = tiny_model("llama")

    def answers():
        cache = StaticCache(config=model.config, max_cache_len=480)
        with torch.no_grad():
            model(PREFIX, **{CACHE: cache})
        return [_ask(model, copy.deepcopy(cache), q) for q in QUESTIONS]

    dense = answers()
    compile_kvpass(model, window_size=16, sink_size=4, estimator="exact")
    kvpass.reset()
    assert [a.tolist() for a in answers()] == [a.tolist() for a in dense]


def test_a_rotated_index_is_fitted_to_the_prompts_queries():
    """retriever "rotated" through torch.compile: the prefill (attended by the model's own SDPA) hands each
    store the prompt's queries, and the first decode step codes the keys in the unit fitted to their mean
    q² — the same moments a dense prefill of the same prompt shows (``prefill_q_sq``)."""
    from kvpass.eval.frontier import dense_prefix, prefill_q_sq

    want = prefill_q_sq(dense_prefix(tiny_model("llama"), PREFIX, PREFIX.shape[1]))  # site -> [1, H, D]
    model = compile_kvpass(tiny_model("llama"), window_size=16, sink_size=4, host_block_size=128,
                           retriever="rotated")
    kvpass.reset()
    cache = _prefill(model, PREFIX)
    stores = [REGISTRY.by_handle(layer.keys) for layer in cache.layers]
    kv, H = stores[0].num_kv_heads, model.config.num_attention_heads
    for store in stores:
        assert store.index.built and not store.index.coded and store.index.q_rows == H // kv * PREFIX.shape[1]
    _ask(model, cache, QUESTIONS[0], new=2)
    for store in stores:
        idx = store.index
        assert idx.coded
        torch.testing.assert_close(idx.q_sq, want[store.site].reshape(1, kv, H // kv, -1).mean(2), rtol=1e-4, atol=1e-6)
