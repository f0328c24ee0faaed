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
