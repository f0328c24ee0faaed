"""The backend end to end on tiny random-weight Llama models: transparency, static-only equals
StreamingLLM, bounded device memory, reporting and errors."""

import importlib.metadata

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

import kvpass
from kvpass.testing import NanoGPTBlock, cache_kwarg, compile_kvpass, greedy, tiny_model

CACHE = cache_kwarg()


def test_backend_is_registered_by_entry_point():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert any(ep.name == "kvpass" and ep.value == "kvpass.backend:kvpass_backend" for ep in eps)
    assert "kvpass" in torch._dynamo.list_backends()


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("batch", [1, 2])
def test_exact_estimator_is_transparent(cache, batch):
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (batch, 150), generator=torch.Generator().manual_seed(1))

    def run():
        kw = {CACHE: StaticCache(config=model.config, max_cache_len=200)} if cache == "static" else {}
        return greedy(model, ids, 24, **kw)

    ref_ids, ref_logits = run()
    compile_kvpass(model, window_size=16, sink_size=4, estimator="exact")
    ids_k, logits_k = run()
    assert torch.equal(ids_k, ref_ids)
    assert (logits_k - ref_logits).abs().max() <= 1e-4
    stats = kvpass.runtime_stats()
    assert stats["tokens_offloaded"] == 2 * (150 + 23 - 20) * batch // batch  # per layer: all but 4+16
    # exact mode reads every offloaded key's K and V row and no code (the kernel's count)
    assert stats["step_bytes_fraction"] == 1.0 and stats["step_code_bytes"] == 0
    # a second sequence through the same compiled model starts fresh stores
    ids_k2, _ = run()
    assert torch.equal(ids_k2, ref_ids)


def _sink_window_sdpa(S, W):
    """Reference: dense SDPA, but a single decode query sees only the first S and last W keys."""
    orig = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        L = k.shape[-2]
        if q.shape[-2] == 1 and L > S + W:
            j = torch.arange(L)
            attn_mask = ((j < S) | (j >= L - W)).view(1, 1, 1, L)
        return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)

    return sdpa


def test_static_only_equals_streaming_llm(monkeypatch):
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 120), generator=torch.Generator().manual_seed(2))
    S, W = 4, 8
    with monkeypatch.context() as m:
        m.setattr(F, "scaled_dot_product_attention", _sink_window_sdpa(S, W))
        ref_ids, ref_logits = greedy(model, ids, 16)
    compile_kvpass(model, window_size=W, sink_size=S, estimator="none")
    ids_k, logits_k = greedy(model, ids, 16)
    assert (logits_k - ref_logits).abs().max() <= 1e-4
    assert torch.equal(ids_k, ref_ids)
    # and it is not dense attention: the reference differs from the unmasked model
    _, dense_logits = greedy(tiny_model("llama"), ids, 16)
    assert (dense_logits - ref_logits).abs().max() > 1e-3


def _cache_storage_bytes(cache: DynamicCache) -> int:
    seen, total = set(), 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


@pytest.mark.parametrize("prompt_len", [512, 2048])
def test_device_kv_is_bounded_and_host_holds_each_token_once(prompt_len):
    model = tiny_model("llama")
    cfg = model.config
    S, W, new = 4, 64, 16
    compile_kvpass(model, sink_size=S, window_size=W)
    ids = torch.randint(1, 256, (1, prompt_len), generator=torch.Generator().manual_seed(3))
    cache = DynamicCache(config=cfg)
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **{CACHE: cache}, pad_token_id=0)
    tokens = prompt_len + new - 1  # the last generated token is never fed back
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_key_value_heads * head_dim * 4  # K and V, fp32, one layer
    dense_bytes = cfg.num_hidden_layers * tokens * per_token
    assert cache.get_seq_length() == tokens  # the model's bookkeeping is intact
    assert _cache_storage_bytes(cache) <= 0.25 * dense_bytes
    stats = kvpass.runtime_stats()
    assert stats["device_kv_bytes"] == cfg.num_hidden_layers * (S + W) * per_token  # not a function of context
    assert stats["tokens_offloaded"] == cfg.num_hidden_layers * (tokens - S - W)
    assert stats["host_kv_bytes"] == stats["tokens_offloaded"] * per_token
    # the last step read every offloaded key's int4 sketch (D/2 bytes a kv head: 1/16 of its fp32 K and V) and
    # a few rows — fewer than the keys when the context is long enough to leave most of them out
    assert stats["step_code_bytes"] >= stats["tokens_offloaded"] * cfg.num_key_value_heads * head_dim // 2
    assert 1 / 16 <= stats["step_bytes_fraction"] < (0.5 if prompt_len > 1000 else 1.2)
    # placeholders are poisoned: reading the cache outside kvpass gives NaN, never plausible numbers
    assert torch.isnan(cache.layers[0].keys).all()


def test_explain_reports_sites_and_changes_nothing():
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 40))
    report = kvpass.explain(model, ids)
    assert [s.name for s in report.sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(s.rewritten and s.phase == "prefill" for s in report.sites)
    assert "2/2 attention sites rewritten" in str(report)
    assert kvpass.runtime_stats()["stores"] == 0
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{CACHE: cache})
    report = kvpass.explain(model, ids[:, :1], **{CACHE: cache}, options={"dense_layers": [1]})
    assert [(s.phase, s.rewritten) for s in report.sites] == [("decode", True), ("-", False)]
    assert report.sites[1].reason == "listed in dense_layers"


def test_dense_layers_keep_their_cache_and_stay_exact():
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 100))
    ref_ids, ref_logits = greedy(model, ids, 10)
    compile_kvpass(model, window_size=8, dense_layers=[0])
    cache = DynamicCache(config=model.config)
    ids_k, logits_k = greedy(model, ids, 10, **{CACHE: cache})
    assert torch.equal(ids_k, ref_ids) and (logits_k - ref_logits).abs().max() <= 1e-4
    assert cache.layers[0].keys.stride(2) != 0 and cache.layers[1].keys.stride(2) == 0


def test_cache_less_module_stays_dense_and_error_mode_names_the_site():
    block = NanoGPTBlock()
    x = torch.randn(1, 10, 64)
    report = kvpass.explain(block, x)
    assert len(report.sites) == 1 and not report.sites[0].rewritten
    assert "no KV-cache update" in report.sites[0].reason
    ref = block(x)
    out = torch.compile(block, backend="kvpass", options={"inductor": False})(x)
    torch.testing.assert_close(out, ref)
    torch._dynamo.reset()
    strict = torch.compile(block, backend="kvpass", options={"on_unmatched": "error"})
    with pytest.raises(Exception, match=r"attention site 0 \(attention\[0\]\).*no KV-cache update"), \
            torch.no_grad():
        strict(x)


@pytest.mark.parametrize("bad, match", [
    ({"window": 3}, r"unknown option\(s\) \['window'\]; valid options are"),
    ({"estimator": "magic"}, "estimator must be one of"),
    ({"budget": 1.5}, "budget must be a fraction"),
    ({"lsh_k": 20}, "lsh_k must be an int in"),
    ({"lsh_threshold": 0}, "lsh_threshold must be"),
    ({"window_size": 0}, "window_size must be an int >= 1"),
    ({"on_unmatched": "ignore"}, "on_unmatched must be"),
    ({"dense_layers": 3}, "dense_layers must be a list"),
])
def test_bad_options_raise(bad, match):
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="kvpass", options=bad)
    with pytest.raises(Exception, match=match):
        compiled(torch.randint(1, 256, (1, 8)))


def test_mode_is_accepted():
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 8))
    with torch.no_grad():
        out = torch.compile(model, backend="kvpass", mode="reduce-overhead")(ids)  # rewritten + Inductor
        torch.testing.assert_close(out.logits, model(ids).logits)


def test_graphs_that_need_gradients_stay_dense():
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 8))
    from kvpass import backend

    with backend.collect_reports() as reports:
        out = torch.compile(model, backend="kvpass", options={"inductor": False})(ids)  # grad mode on
    out.logits.sum().backward()  # gradients flow: the graph is the original one
    assert not any(s.rewritten for s in reports[0].sites)
    assert "autograd is on" in reports[0].sites[0].reason


def test_reset_mid_sequence_is_a_clear_error():
    model = compile_kvpass(tiny_model("llama"), window_size=8)
    ids = torch.randint(1, 256, (1, 30))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{CACHE: cache})
        kvpass.reset()
        with pytest.raises(Exception, match="no live store owns"):
            model(ids[:, :1], **{CACHE: cache})


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True,
                              **kw)


@pytest.mark.parametrize("num_beams,batch", [(2, 1), (4, 2)])
def test_beam_search_follows_the_cache_reorder(num_beams, batch):
    """Beam search reorders the cache every step (index_select of batch rows): the copied placeholders carry
    their store and row in NaN payloads, and the store follows — exact mode returns dense's beams and
    scores; sampling runs on the reordered rows (finite scores, every step reordered)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (batch, 300), generator=torch.Generator().manual_seed(0))
    kw = {"max_new_tokens": 10, "num_beams": num_beams, "num_return_sequences": num_beams}
    ref = _generate(model, ids, **kw)
    compile_kvpass(model, window_size=8, sink_size=2, estimator="exact")
    out = _generate(model, ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert (out.sequences_scores - ref.sequences_scores).abs().max() <= 1e-3
    torch._dynamo.reset()
    compile_kvpass(model, window_size=8, sink_size=2, estimator="sample", retriever="lsh")
    kvpass.reset()
    out = _generate(model, ids, **kw)
    stores = kvpass.runtime.REGISTRY.stores()
    assert torch.isfinite(out.sequences_scores).all() and out.sequences.shape == ref.sequences.shape
    assert all(s.reorders > 0 for s in stores) and len(stores) == 2
    assert kvpass.runtime_stats()["reorders"] == sum(s.reorders for s in stores)
    assert kvpass.release(out.past_key_values) == 2  # the cache holds reordered copies: found by their tags


def test_a_cache_converted_outside_kvpass_is_a_clear_error():
    """A dtype conversion of the cache drops the tags: kvpass refuses the NaN, never adopts it as KV."""
    model = compile_kvpass(tiny_model("llama"), window_size=8, estimator="exact")
    ids = torch.randint(1, 256, (1, 30))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{CACHE: cache})
        for layer in cache.layers:
            layer.keys = layer.keys.to(torch.bfloat16).float()
            layer.values = layer.values.to(torch.bfloat16).float()
        with pytest.raises(Exception, match="NaN where KV should be"):
            model(ids[:, :1], **{CACHE: cache})


@pytest.mark.parametrize("window", [16, 8])
def test_assisted_decoding_equals_dense_in_exact_mode(window):
    """Assisted decoding verifies a 12-token draft in one block and crops the rejected part
    (``cache.crop``): the store drops those tokens, from the host store too when the block pushed some
    there (window 8 < 13-token block: the block's own tokens reach the host, and that step applies the
    causal mask exactly)."""
    model, helper = tiny_model("llama"), tiny_model("llama", num_hidden_layers=1)
    helper.generation_config.num_assistant_tokens = 12
    helper.generation_config.num_assistant_tokens_schedule = "constant"
    helper.generation_config.assistant_confidence_threshold = 0.0
    ids = torch.randint(3, 256, (1, 300), generator=torch.Generator().manual_seed(0))
    ref = _generate(model, ids, max_new_tokens=30)
    compile_kvpass(model, window_size=window, sink_size=2, estimator="exact")
    kvpass.reset()
    out = _generate(model, ids, max_new_tokens=30, assistant_model=helper)
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max() for a, b in zip(out.scores, ref.scores)) <= 1e-4
    stores = kvpass.runtime.REGISTRY.stores()
    assert all(s.crops > 0 for s in stores)
    assert all(s.masked_steps > 0 for s in stores) == (window == 8)


def test_a_block_longer_than_the_window_is_causal():
    """A multi-token step longer than window + 1 puts its own first tokens in the host store; their queries
    must not see the later ones (the CPU kernel takes every host key as visible): exact equals dense."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 320), generator=torch.Generator().manual_seed(2))

    def run():
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids[:, :300], **{CACHE: cache})
            return model(ids[:, 300:], **{CACHE: cache}).logits

    ref = run()
    compile_kvpass(model, window_size=8, sink_size=2, estimator="exact")
    kvpass.reset()
    out = run()
    assert (out - ref).abs().max() <= 1e-4
    assert all(s.masked_steps == 1 for s in kvpass.runtime.REGISTRY.stores())


def test_chunked_prefill_equals_dense_and_bounds_the_device_kv():
    """generate(prefill_chunk_size=128): each chunk after the first is a block over the stored prompt
    (attended exactly, causal), so exact mode gives dense's tokens and logits; the peak device KV
    (``runtime_stats()["peak_device_kv_bytes"]``: every store's static slots + the block a layer appends)
    is the static part plus one 128-token chunk of one layer, instead of the whole 600-token prompt.  The
    chunks after the first are attended by torch's SDPA over every stored token (ops._every_token_causal)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 600), generator=torch.Generator().manual_seed(5))
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "output_logits": True,
          "return_dict_in_generate": True}
    ref = model.generate(ids, **kw)
    compile_kvpass(model, window_size=16, estimator="exact")
    peaks = {}
    for chunk in (128, None):  # chunks first, from a fresh compile (a 128-token block over a stored prefix)
        kvpass.reset()
        out = model.generate(ids, prefill_chunk_size=chunk, **kw)
        assert torch.equal(out.sequences, ref.sequences), chunk
        assert max((a - b).abs().max() for a, b in zip(out.logits, ref.logits)) <= 1e-4, chunk
        stats = kvpass.runtime_stats()
        peaks[chunk] = stats["peak_device_kv_bytes"]
        assert stats["masked_steps"] == (0 if chunk is None else 2 * 4)  # chunks 2-5, both layers
    token_kv = 2 * model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads) * 4
    static = stats["device_kv_bytes"]  # both layers' sinks + window
    assert peaks[128] == static + 128 * token_kv
    assert peaks[None] == static + 600 * token_kv


def test_left_padded_batch_takes_the_split_and_equals_each_prompt_alone():
    """A left-padded batch (prompts of 300, 260 and 180 tokens): the mask is causal with left padding,
    which the split applies itself — the padding is never attended, not even as a sink — so it takes the
    fast path (masked_steps 0), and exact mode gives each prompt's own tokens."""
    model = tiny_model("llama")
    lengths = [300, 260, 180]
    prompts = [torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths]
    ids = torch.zeros(3, 300, dtype=torch.long)
    mask = torch.zeros(3, 300, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, 300 - p.shape[1]:], mask[b, 300 - p.shape[1]:] = p[0], 1
    alone = [greedy(model, p, 10) for p in prompts]
    compile_kvpass(model, window_size=8, sink_size=2, estimator="exact")
    kvpass.reset()
    ids_k, logits_k = greedy(model, ids, 10, attention_mask=mask)
    for b, (ref_ids, ref_logits) in enumerate(alone):
        assert torch.equal(ids_k[b, 300:], ref_ids[0, lengths[b]:]), b
        assert (logits_k[b] - ref_logits[0]).abs().max() <= 1e-4
    stats = kvpass.runtime_stats()
    assert stats["masked_steps"] == 0 and stats["tokens_offloaded"] == 2 * (300 + 9 - 2 - 8)


def test_other_masks_are_applied_exactly_on_the_masked_path(caplog, monkeypatch):
    """A mask that is neither causal nor left-padded causal (a hole in the middle of a row): applied
    exactly on the slower torch path, counted in runtime_stats, said in one log line (not per layer)."""
    import logging

    from kvpass import ops

    monkeypatch.setattr(ops, "_WARNED", set())
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 10:15] = 0
    ref_ids, ref_logits = greedy(model, ids, 8, attention_mask=mask)
    compile_kvpass(model, window_size=8)
    kvpass.reset()
    with caplog.at_level(logging.WARNING, logger="kvpass"):
        ids_k, logits_k = greedy(model, ids, 8, attention_mask=mask)
    assert sum("neither plain causal" in r.getMessage() for r in caplog.records) == 1
    assert torch.equal(ids_k, ref_ids) and (logits_k - ref_logits).abs().max() <= 1e-4
    stats = kvpass.runtime_stats()
    assert stats["tokens_offloaded"] == 2 * (40 + 7 - 4 - 8)
    assert stats["masked_steps"] == 2 * 7  # every decode step of both layers took the masked path


def test_a_prompt_token_equal_to_the_pad_token_is_attended():
    """generate infers a mask from the pad token when given none, hiding every prompt token equal to it —
    a hole that sends each step down the masked path.  kvpass's greedy passes the whole prompt's mask: a
    prompt holding token 0 (the pad id it uses) takes the split and equals dense."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    ids[0, 17] = 0
    ref_ids, ref_logits = greedy(model, ids, 8)
    compile_kvpass(model, window_size=8)
    kvpass.reset()
    ids_k, logits_k = greedy(model, ids, 8)
    assert torch.equal(ids_k, ref_ids) and (logits_k - ref_logits).abs().max() <= 1e-4
    assert kvpass.runtime_stats()["masked_steps"] == 0


def _causal_4d(q_len: int, past: int) -> torch.Tensor:
    """The explicit [1, 1, Tq, L] bool causal mask that transformers 5.17 builds under torch.compile."""
    L = past + q_len
    return (torch.arange(L)[None, :] <= torch.arange(past, L)[:, None])[None, None]


def test_explicit_causal_masks_take_the_fast_path():
    """transformers 5.17 passes an explicit causal bool mask at prefill and decode (5.24 passes None):
    kvpass must rewrite those sites too, and its run-time check must find the mask plain causal."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 60), generator=torch.Generator().manual_seed(4))

    def run():
        cache, out, tok = DynamicCache(config=model.config), [], ids
        with torch.no_grad():
            for step in range(6):
                past = cache.get_seq_length()
                logits = model(tok, attention_mask=_causal_4d(tok.shape[1], past), **{CACHE: cache},
                               position_ids=torch.arange(past, past + tok.shape[1])[None]).logits[:, -1]
                out.append(logits)
                tok = logits.argmax(-1, keepdim=True)
        return torch.stack(out, 1)

    ref = run()
    with kvpass.backend.collect_reports() as reports:
        compile_kvpass(model, window_size=8)
        got = run()
    assert (got - ref).abs().max() <= 1e-4
    sites = [s for r in reports for s in r.sites]
    assert sites and all(s.rewritten for s in sites), [s.reason for s in sites]
    stats = kvpass.runtime_stats()
    assert stats["masked_steps"] == 0 and stats["tokens_offloaded"] == 2 * (60 + 5 - 4 - 8)


@pytest.mark.parametrize("lsh", [{}, {"lsh_k": 1, "lsh_l": 24, "lsh_threshold": 1}])
def test_sample_estimator_through_the_compiler(lsh):
    """Enough offloaded keys for the LSH index: the compiled path samples, the index covers every
    offloaded token (prompt and generated).  A random tiny model attends almost uniformly, where a
    few-percent sample is noisy by nature (quality is measured on SmolLM2's real activations), so
    closeness to dense is checked with an index that retrieves nearly every key (1 bit, 24 tables,
    threshold 1: P(retrieved) ≈ 1 - 2^-24): then the importance weights are ≈ 1 and sample ≈ exact."""
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 700), generator=torch.Generator().manual_seed(5))
    _, ref_logits = greedy(model, ids, 6)
    compile_kvpass(model, window_size=16, estimator="sample", **lsh)
    _, logits = greedy(model, ids, 6)
    stats = kvpass.runtime_stats()
    assert torch.isfinite(logits).all() and stats["index_bytes"] > 0
    for store in kvpass.runtime.REGISTRY.stores():
        assert store.index.built and store.index.tail_base + store.index.tail_len == store.tokens_offloaded
    if lsh:
        assert stats["keys_read_fraction"] > 0.95
        assert (logits - ref_logits).abs().max() <= 1e-3
    else:
        assert 0 < stats["keys_read_fraction"] < 0.2


def test_finished_sequences_free_their_stores():
    """A sequence whose cache is gone loses its stores when the next one starts (only the live
    sequence's stores remain: one per layer).  The cache of a finished generate() is freed by Python's
    cycle collector, hence gc.collect() here."""
    import gc

    model = compile_kvpass(tiny_model("llama"), window_size=8)
    ids = torch.randint(1, 256, (1, 50), generator=torch.Generator().manual_seed(6))
    for _ in range(3):
        gc.collect()
        greedy(model, ids, 4)
        assert kvpass.runtime_stats()["stores"] == 2


@pytest.mark.slow
def test_a_thousand_sequences_keep_memory_flat():
    """A serving loop: 1,000 requests (prefill + two decode steps, each with its own cache), one after the
    other.  After the warm-up (the compiles: Dynamo keeps the caches it saw in reference cycles, which
    kvpass collects once at the next sequence start), each finished request leaves at most its own stores
    until the next one starts, and the process's resident memory stays flat (within 5%)."""
    import gc
    import os

    from kvpass import ops

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    kvpass.reset()
    gc.collect()
    model = compile_kvpass(tiny_model("llama"), window_size=8, sink_size=2)
    gen = torch.Generator().manual_seed(0)
    live = []
    for i in range(1000):
        n = 40 + int(torch.randint(0, 24, (1,), generator=gen))  # prompts of different lengths
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            logits = model(torch.randint(3, 256, (1, n), generator=gen), **{CACHE: cache}).logits
            for _ in range(2):
                logits = model(logits[:, -1:].argmax(-1), **{CACHE: cache}).logits
        if i == 0:
            one = kvpass.runtime_stats()["host_reserved_bytes"]  # one sequence's stores
        del cache, logits
        stats = kvpass.runtime_stats()
        live.append(stats["sequences"])
        assert stats["host_reserved_bytes"] <= ops.GC_FLOOR + 2 * one, (i, stats)
        if i == 199:
            base = rss()
    assert max(live[10:]) == 1, [(i, n) for i, n in enumerate(live) if n > 1][:10]  # the finished one only
    assert rss() <= 1.05 * base, (rss() - base) / 2**20


def test_release_frees_a_finished_sequence_and_its_cache_then_refuses_to_continue():
    model = compile_kvpass(tiny_model("llama"), window_size=8)
    ids = torch.randint(1, 256, (1, 30))
    first, second = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{CACHE: first})
        model(ids[:, :20], **{CACHE: second})
        assert kvpass.runtime_stats()["stores"] == 4 and kvpass.runtime_stats()["sequences"] == 2
        assert kvpass.release(first) == 2
        stats = kvpass.runtime_stats()
        assert stats["stores"] == 2 and stats["tokens_offloaded"] == 2 * (20 - 4 - 8)
        assert kvpass.release(first) == 0  # already gone
        model(ids[:, :1], **{CACHE: second})  # the other sequence goes on
        with pytest.raises(Exception, match="no live store owns"):
            model(ids[:, :1], **{CACHE: first})


def test_release_frees_a_static_cache_sequence():
    model = compile_kvpass(tiny_model("llama"), window_size=8)
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        model(torch.randint(1, 256, (1, 30)), **{CACHE: cache}, cache_position=torch.arange(30))
    assert kvpass.runtime_stats()["stores"] == 2
    assert kvpass.release(cache) == 2 and kvpass.runtime_stats()["stores"] == 0


def test_cpu_threads_sets_the_kernels_team_not_torchs():
    """options={"cpu_threads": 1}: the CPU kernel runs one thread — same tokens and logits as the default
    team (each query row is one thread's work) — and torch's own thread setting is left as it was."""
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 600), generator=torch.Generator().manual_seed(7))
    before = torch.get_num_threads()
    compile_kvpass(model, window_size=16)
    ref, ref_logits = greedy(model, ids, 4)
    torch._dynamo.reset()
    kvpass.reset()
    compile_kvpass(model, window_size=16, cpu_threads=1)
    out, logits = greedy(model, ids, 4)
    assert torch.get_num_threads() == before
    assert torch.equal(out, ref) and torch.equal(logits, ref_logits)
    assert all(s.cpu_threads == 1 for s in kvpass.runtime.REGISTRY.stores())


def test_the_kernel_leaves_a_core_to_the_accelerators_host_thread():
    from kvpass.runtime.store import kernel_threads

    n = torch.get_num_threads()
    assert kernel_threads(0, torch.device("cpu")) == n
    assert kernel_threads(0, torch.device("cuda")) == max(1, n - 1)
    assert kernel_threads(3, torch.device("cuda")) == 3 and kernel_threads(1, torch.device("cpu")) == 1
