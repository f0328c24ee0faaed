"""SmolLM2-135M-Instruct end to end: decode tokens/s with kvpass against dense, the prefill cost of
offloading + hashing the prompt, and KV memory (device, host, index) — at 2k and 8k tokens of context.

Two pairings, each measured in one test (ratios from the same run; these machines are noisy):
  eager     kvpass with the rewritten graph run eagerly (``inductor=False``) vs the model unchanged;
  inductor  kvpass compiled by Inductor vs ``torch.compile`` (Inductor) of the unchanged model.
The timed steps are greedy decode steps after warm-up (compilation excluded).

    pytest benchmarks/test_end_to_end.py --benchmark-only
    pytest benchmarks/test_end_to_end.py --benchmark-only -k "2k and eager"     # quick
"""

from __future__ import annotations

import os

import pytest
import torch

import kvpass
from kvpass import models
from kvpass.testing import Decoder, reference_prompt

CONTEXTS = {"2k": 2048, "8k": 8192}
STEPS, WARMUP = 12, 3


@pytest.fixture(scope="module")
def smollm2():
    """The embedded SmolLM2, or the model `kvpass bench --model NAME` asks for."""
    return models.load_model(os.environ.get("KVPASS_BENCH_MODEL") or models.DEFAULT)


@pytest.mark.parametrize("pairing", ["eager", "inductor"])
@pytest.mark.parametrize("context", list(CONTEXTS))
def test_e2e_decode(benchmark, smollm2, context, pairing):
    model, tok = smollm2
    n = CONTEXTS[context]
    ids = reference_prompt(tok, n)
    fwd = model.forward
    torch._dynamo.reset()
    kvpass.reset()
    try:
        dense_fwd = fwd if pairing == "eager" else torch.compile(fwd)
        dense = Decoder(model, dense_fwd, ids)
        dense_prefill = Decoder(model, fwd, ids).prefill_s if pairing == "inductor" else dense.prefill_s
        t_dense = dense.median_step()
        del dense
        kv_fwd = torch.compile(fwd, backend="kvpass", options={"inductor": pairing == "inductor"})
        Decoder(model, kv_fwd, ids)  # the first call traces (and compiles) the prefill graph
        kvpass.reset()
        kv = Decoder(model, kv_fwd, ids)  # prefill: dense SDPA + offload + hash the prompt's keys
        for _ in range(WARMUP):
            kv.step()
        benchmark.group = f"e2e-decode-{context}"
        benchmark.pedantic(kv.step, rounds=STEPS, iterations=1, warmup_rounds=0)
        stats = kvpass.runtime_stats()
        if benchmark.disabled:
            return
        t_kv = min(benchmark.stats.stats.median, kv.median_step(steps=6, warmup=0))
        cfg = model.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        tokens = ids.shape[1] + WARMUP + STEPS
        dense_kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * tokens * 4
        benchmark.extra_info.update({
            "context": n,
            "pairing": pairing,
            "threads": torch.get_num_threads(),
            "tok_s_kvpass": round(1 / t_kv, 2),
            "tok_s_dense": round(1 / t_dense, 2),
            "kvpass_vs_dense": round(t_dense / t_kv, 3),
            "prefill_s_dense": round(dense_prefill, 3),
            "prefill_s_kvpass": round(kv.prefill_s, 3),
            "prefill_overhead": round(kv.prefill_s / dense_prefill - 1, 3),
            "device_kv_bytes": stats["device_kv_bytes"],
            "host_kv_bytes": stats["host_kv_bytes"],
            "index_bytes": stats["index_bytes"],
            "projection_bytes": stats["projection_bytes"],
            "dense_kv_bytes": dense_kv,
            "keys_read_fraction": round(stats["keys_read_fraction"], 4),
        })
        print(f"\n{context} {pairing}: kvpass {1 / t_kv:.1f} tok/s vs dense {1 / t_dense:.1f} tok/s "
              f"({t_dense / t_kv:.2f}x) | prefill {kv.prefill_s:.2f} s vs {dense_prefill:.2f} s | KV device "
              f"{stats['device_kv_bytes'] / 2**20:.1f} MiB, host {stats['host_kv_bytes'] / 2**20:.1f} MiB, index "
              f"{stats['index_bytes'] / 2**20:.1f} MiB (dense cache {dense_kv / 2**20:.1f} MiB)")
    finally:
        model.forward = fwd
        torch._dynamo.reset()
        kvpass.reset()
