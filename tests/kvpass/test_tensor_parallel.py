"""Tensor parallel on torch.distributed: a model sharded by heads (transformers' tp_plan="auto", gloo ranks
on CPU), compiled with kvpass on every rank — each rank's pass sees its own heads and keeps its own store."""

import pytest
import torch
import torch.distributed as dist

import kvpass
from kvpass.testing import compile_kvpass, greedy, run_tensor_parallel, tiny_model

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

OPTS = {"window_size": 8, "sink_size": 2}
RUNS = {"exact": {**OPTS, "estimator": "exact"}, "defaults": OPTS,
        "sample": {**OPTS, "estimator": "sample", "retriever": "lsh"}}


def test_two_ranks_equal_one_process(tmp_path):
    """Exact: the unsharded dense tokens.  The defaults and LSH sampling: the same tokens as one process
    with the whole model (every head hashes and selects alike whichever rank holds it), the same keys read
    on average, and each rank holding half the host KV."""
    model = tiny_model("llama")  # 4 q / 2 kv heads: one kv head per rank
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 256, (1, 400), generator=torch.Generator().manual_seed(0))
    ranks = run_tensor_parallel(2, str(tmp_path), ids, RUNS)
    dense = greedy(model, ids, 12)[0].tolist()
    single = {}
    for name, options in RUNS.items():
        torch._dynamo.reset()
        kvpass.reset()
        fwd = model.forward
        compile_kvpass(model, **options)
        single[name] = (greedy(model, ids, 12)[0].tolist(), kvpass.runtime_stats())
        model.forward = fwd
    for r in range(2):
        assert ranks[r, "dense"][0] == dense
        assert ranks[r, "exact"][0] == dense
        for name in RUNS:
            tokens, stats = ranks[r, name]
            assert tokens == single[name][0], (r, name)
            assert stats["host_kv_bytes"] * 2 == single[name][1]["host_kv_bytes"]
            assert stats["tokens_offloaded"] == single[name][1]["tokens_offloaded"]  # every rank: every token
    assert single["defaults"][0] != dense  # sampling changed the answer: the comparison above has teeth
    for name in ("defaults", "sample"):
        per_rank = [ranks[r, name][1]["keys_read_fraction"] for r in range(2)]
        assert sum(per_rank) / 2 == pytest.approx(single[name][1]["keys_read_fraction"], rel=1e-6)
