"""gemma-3-270m (installed by hand: `kvpass models install gemma-3-270m`; skipped, with that line, where it is
absent — CI stays on SmolLM2 and the tiny models): 15 of its 18 layers are sliding-window (512 tokens)."""

import pytest
import torch

import kvpass
from kvpass import models
from kvpass.testing import compile_kvpass, greedy, reference_prompt

NAME = "gemma-3-270m"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not models.installed(NAME), reason=f"run `kvpass models install {NAME}`")]


def test_exact_equals_dense_past_the_window_and_sliding_layers_stay_dense():
    """A 1,400-token prompt (2.7x the window): exact mode gives dense's tokens and logits within 1e-3; the
    sliding-window layers keep their own bounded cache (explain says so) and only the 3 full layers offload."""
    model, tok = models.load_model(NAME)
    ids = reference_prompt(tok, 1400)
    report = kvpass.explain(lambda x: model(input_ids=x, use_cache=True), ids[:, :600])
    sliding = [s for s in report.sites if not s.rewritten]
    assert len(sliding) == 15 and all("sliding-window layer" in s.reason for s in sliding), report
    ref_ids, ref_logits = greedy(model, ids, 16)
    compile_kvpass(model, estimator="exact")
    got_ids, got_logits = greedy(model, ids, 16)
    assert torch.equal(got_ids, ref_ids)
    assert (got_logits - ref_logits).abs().max() <= 1e-3
    assert kvpass.runtime_stats()["tokens_offloaded"] == 3 * (1400 + 15 - 4 - 64)
