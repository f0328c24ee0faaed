"""Transparency of estimator="exact" across decoder families and module styles (CPU, random weights)."""

import pytest
import torch

import kvpass
from kvpass.testing import GptFast, compile_kvpass, gptfast_greedy, greedy, tiny_model


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma", "gpt2"])
def test_family_exact_equals_dense(family):
    model = tiny_model(family)
    ids = torch.randint(3, 256, (1, 90), generator=torch.Generator().manual_seed(5))
    ref_ids, ref_logits = greedy(model, ids, 12)
    compile_kvpass(model, window_size=16)
    ids_k, logits_k = greedy(model, ids, 12)
    assert torch.equal(ids_k, ref_ids)
    assert (logits_k - ref_logits).abs().max() <= 1e-4
    layers = model.config.num_hidden_layers
    assert kvpass.runtime_stats()["tokens_offloaded"] == layers * (90 + 11 - 4 - 16)


@pytest.mark.parametrize("estimator", ["exact", "topk", "sample"])
def test_hybrid_sliding_window_layers_keep_their_own_window(estimator):
    """Gemma-3 style: the sliding-window layer (32 tokens) is left dense with the model's own bounded cache
    — never offloaded — and says so in explain; the full layer is split.  Exact mode equals dense over a
    prompt 12x the window; the sparse estimators offload only the full layer's tokens."""
    model = tiny_model("gemma3")
    ids = torch.randint(3, 256, (1, 400), generator=torch.Generator().manual_seed(5))
    report = kvpass.explain(lambda x: model(input_ids=x, use_cache=True), ids)
    sliding, full = report.sites
    assert not sliding.rewritten and "sliding-window layer" in sliding.reason and "last 31 tokens" in sliding.reason
    assert full.rewritten
    ref_ids, ref_logits = greedy(model, ids, 12)
    compile_kvpass(model, window_size=16, estimator=estimator, lsh_k=4, lsh_l=20, budget=40)
    ids_k, logits_k = greedy(model, ids, 12)
    if estimator == "exact":
        assert torch.equal(ids_k, ref_ids)
        assert (logits_k - ref_logits).abs().max() <= 1e-4
    assert kvpass.runtime_stats()["tokens_offloaded"] == 1 * (400 + 11 - 4 - 16)  # the full layer only


def test_eager_attention_is_recognised_and_rewritten():
    """attn_implementation="eager" (matmul → scale → + mask → softmax (fp32) → dropout(p=0) → matmul) becomes
    a site like SDPA's: rewritten, exact mode equals dense, sampling runs on it."""
    import transformers as tf

    from kvpass.testing import TINY

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**TINY), attn_implementation="eager").eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4.0)
    ids = torch.randint(3, 256, (1, 300), generator=torch.Generator().manual_seed(5))
    report = kvpass.explain(lambda x: model(input_ids=x, use_cache=True), ids)
    assert [s.rewritten for s in report.sites] == [True, True] and not report.unmatched
    ref_ids, ref_logits = greedy(model, ids, 10)
    fwd = model.forward
    compile_kvpass(model, window_size=16, estimator="exact")
    ids_k, logits_k = greedy(model, ids, 10)
    assert torch.equal(ids_k, ref_ids) and (logits_k - ref_logits).abs().max() <= 1e-4
    assert kvpass.runtime_stats()["tokens_offloaded"] == 2 * (300 + 9 - 4 - 16)
    torch._dynamo.reset()
    kvpass.reset()
    model.forward = fwd
    compile_kvpass(model, window_size=16, estimator="sample", lsh_k=4, lsh_l=20)
    greedy(model, ids, 10)
    assert 0 < kvpass.runtime_stats()["keys_read_fraction"] < 1


@pytest.mark.parametrize("estimator", ["exact", "sample"])
def test_gemma2_logit_soft_capping_is_rewritten(estimator):
    """Gemma2 (eager attention, tanh soft-capping of the scores, a sliding-window layer): the capped full
    layer becomes a kvpass site whose static part and CPU kernel cap the scores as the model does; exact
    mode equals dense over a prompt 10x the window, and the cap is small enough here to change the output
    (so a kvpass that ignored it would fail)."""
    import transformers as tf

    from kvpass.testing import TINY

    def gemma2(cap):
        torch.manual_seed(0)
        cfg = tf.Gemma2Config(head_dim=16, attn_logit_softcapping=cap, sliding_window=32, query_pre_attn_scalar=16,
                              **TINY)
        m = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        with torch.no_grad():  # scores of a few units: the cap bends them
            for layer in m.model.layers:
                layer.self_attn.q_proj.weight.mul_(12.0)
                layer.self_attn.k_proj.weight.mul_(12.0)
        return m

    model = gemma2(1.0)
    ids = torch.randint(3, 256, (1, 320), generator=torch.Generator().manual_seed(5))
    report = kvpass.explain(lambda x: model(input_ids=x, use_cache=True), ids)
    sliding, full = report.sites
    assert not sliding.rewritten and "sliding-window layer" in sliding.reason
    assert full.rewritten and not report.unmatched
    ref_ids, ref_logits = greedy(model, ids, 10)
    _, uncapped = greedy(gemma2(None), ids, 10)
    assert (uncapped - ref_logits).abs().max() > 0.1  # the cap matters on this prompt
    compile_kvpass(model, window_size=16, estimator=estimator, lsh_k=4, lsh_l=20)
    ids_k, logits_k = greedy(model, ids, 10)
    assert kvpass.runtime_stats()["tokens_offloaded"] == 1 * (320 + 9 - 4 - 16)  # the full layer only
    if estimator == "exact":
        assert torch.equal(ids_k, ref_ids) and (logits_k - ref_logits).abs().max() <= 1e-4
    else:
        assert torch.isfinite(logits_k).all() and 0 < kvpass.runtime_stats()["keys_read_fraction"] < 1


def test_an_unrecognised_tanh_stays_dense_with_a_reason_and_one_warning(caplog):
    """A tanh before the softmax that is not a soft-cap c·tanh(s / c) (here 50·tanh(s / 30)): the site is
    named with the reason, the compile warns once, and the model's own attention runs."""
    import logging

    class OddCap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x):
            q, k, v = self.qkv(x).view(1, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
            att = torch.tanh((q @ k.transpose(-2, -1)) * 0.25 / 30.0) * 50.0
            return torch.softmax(att, dim=-1) @ v

    model = OddCap().eval()
    x = torch.randn(1, 12, 32)
    report = kvpass.explain(model, x)
    assert report.rewritten == 0 and len(report.unmatched) == 1 and "not a logit soft-cap" in report.unmatched[0]
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model, backend="kvpass")
        with caplog.at_level(logging.WARNING, logger="kvpass"):
            got = compiled(x)
    warned = [r for r in caplog.records if "no attention was rewritten" in r.getMessage()]
    assert len(warned) == 1 and "soft-cap" in warned[0].getMessage()
    torch.testing.assert_close(got, ref)


def test_gptfast_module_with_preallocated_cache_and_bool_mask():
    model = GptFast().eval()
    prompt = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref_ids, ref_logits = gptfast_greedy(model, prompt, 16)
        report = kvpass.explain(model, prompt[:, :1], torch.tensor([60]))
        assert [(s.cache, s.phase, s.rewritten) for s in report.sites] == [("static", "decode", True)] * 2
        step = torch.compile(model, backend="kvpass", options={"inductor": False, "window_size": 8})
        ids_k, logits_k = gptfast_greedy(step, prompt, 16)
    assert torch.equal(ids_k, ref_ids)
    assert (logits_k - ref_logits).abs().max() <= 1e-4
    assert kvpass.runtime_stats()["tokens_offloaded"] == 2 * (60 + 15 - 4 - 8)


def test_handwritten_decomposed_attention_over_a_preallocated_cache():
    """nanoGPT-style attention written out (q @ kᵀ · s, masked_fill(~mask, -inf), softmax, @ v) over the
    gpt-fast cache: recognised as a site and rewritten; exact mode gives the SDPA model's tokens."""
    prompt = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref_ids, ref_logits = gptfast_greedy(GptFast().eval(), prompt, 16)
        model = GptFast(decomposed=True).eval()
        report = kvpass.explain(model, prompt[:, :1], torch.tensor([60]))
        assert [(s.cache, s.phase, s.rewritten) for s in report.sites] == [("static", "decode", True)] * 2
        step = torch.compile(model, backend="kvpass", options={"inductor": False, "window_size": 8, "estimator": "exact"})
        ids_k, logits_k = gptfast_greedy(step, prompt, 16)
    assert torch.equal(ids_k, ref_ids)
    assert (logits_k - ref_logits).abs().max() <= 1e-4
