"""The real embedded model: SmolLM2-135M-Instruct (30 layers, GQA 9/3, real weights), real text."""

import pytest
import torch

import kvpass
from kvpass.testing import greedy
from kvpass.text import long_document_prompt


@pytest.fixture(scope="module")
def smollm2():
    return kvpass.load_default_model()


@pytest.mark.slow
def test_exact_split_generates_the_dense_tokens(smollm2):
    model, tok = smollm2
    prompt = long_document_prompt(tok, 1600, "Summarise the text above in two sentences.")
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert ids.shape[1] >= 1500
    ref_ids, ref_logits = greedy(model, ids, 64)

    from kvpass import backend

    fwd = model.forward
    model.forward = torch.compile(fwd, backend="kvpass",
                                  options={"estimator": "exact", "inductor": False, "window_size": 64})
    try:
        with backend.collect_reports() as reports:
            ids_k, logits_k = greedy(model, ids, 64)
    finally:
        model.forward = fwd
    assert torch.equal(ids_k, ref_ids)
    per_step = (logits_k - ref_logits).abs().amax(dim=(0, 2))
    assert per_step.max() <= 1e-3, per_step
    decode = [r for r in reports if r.sites and all(s.phase == "decode" for s in r.sites)]
    assert decode and all(r.rewritten == 30 and len(r.sites) == 30 for r in decode)
    assert all(r.rewritten == 30 for r in reports)
    stats = kvpass.runtime_stats()
    assert stats["tokens_offloaded"] == 30 * (ids.shape[1] + 63 - 4 - 64)
