"""A real long-context model end to end: Qwen2.5-Coder-0.5B greedy decode after 8k / 16k / 32k tokens of
CPython's own sources — kvpass (defaults, Inductor) against eager dense and ``torch.compile`` dense and
against kvpass at the MagicPIG preset, decode step times measured in one run; prefill time; device,
host and index bytes; process peak RSS.

Run by hand (not in CI; 16k takes ~15 min on 2 cores, most of it the dense prefill):

    kvpass models install qwen2.5-coder-0.5b
    pytest benchmarks/test_long_context.py --benchmark-only -k 16k

Another installed model: ``KVPASS_LONG_MODEL=qwen2.5-coder-1.5b pytest benchmarks/test_long_context.py ...``.

One dense prefill serves all three: its cache is copied for the two dense decodes, and kvpass adopts it at
its first decode step (offloading and hashing every prompt key: that step's time is reported apart as
the offload cost, which kvpass's own prefill pays instead).
"""

from __future__ import annotations

import copy
import os
import resource
import statistics
import time

import pytest
import torch

import kvpass
from kvpass import models
from kvpass.hf import cache_kwarg
from kvpass.eval.text import python_source_text

MODEL = os.environ.get("KVPASS_LONG_MODEL", "qwen2.5-coder-0.5b")
CONTEXTS = {"8k": 8192, "16k": 16384, "32k": 32768}
STEPS, WARMUP = 8, 3

pytestmark = pytest.mark.skipif(not models.installed(MODEL), reason=f"run `kvpass models install {MODEL}`")


@pytest.fixture(scope="module")
def qwen():
    return models.load_model(MODEL)


def _op_ms(fn, ops: tuple[str, ...], steps: int = 3) -> dict[str, float]:
    """Milliseconds per call of fn spent in each of ``ops`` (torch profiler, CPU time incl. children)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    return {op: round(totals.get(op, 0.0) / steps / 1e3, 1) for op in ops}


def _steps(fwd, cache, token, n):
    """n greedy decode steps through fwd; returns (per-step seconds, last token)."""
    times = []
    with torch.no_grad():
        for _ in range(n):
            t0 = time.perf_counter()
            out = fwd(input_ids=token, use_cache=True, **{cache_kwarg(): cache})
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t0)
    return times, token


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_long_context_decode(benchmark, qwen, context):
    from transformers import DynamicCache

    model, tok = qwen
    n = CONTEXTS[context]
    ids = tok(python_source_text(), return_tensors="pt")["input_ids"][:, :n]
    fwd = model.forward
    torch._dynamo.reset()
    kvpass.reset()
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    with torch.no_grad():
        first = fwd(input_ids=ids, use_cache=True, logits_to_keep=1,  # the last position's logits only
                    **{cache_kwarg(): cache}).logits[:, -1:].argmax(-1)
    prefill_s = time.perf_counter() - t0
    dense_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)

    eager_cache = copy.deepcopy(cache)
    eager, last = _steps(fwd, eager_cache, first, WARMUP + STEPS)
    sdpa = "aten::scaled_dot_product_attention"
    dense_attn = _op_ms(lambda: _steps(fwd, eager_cache, last, 1), (sdpa,))[sdpa]  # where dense's time goes
    eager_cache = None  # its memory back before the compiled run
    compiled_fwd = torch.compile(fwd)
    compiled, _ = _steps(compiled_fwd, copy.deepcopy(cache), first, WARMUP + STEPS)
    t_eager, t_compiled = statistics.median(eager[WARMUP:]), statistics.median(compiled[WARMUP:])

    # kvpass at its defaults, then at the MagicPIG preset (the reference method's configuration), each
    # adopting a copy of the prefilled cache
    results = {}
    configs = (("defaults", {}), ("magicpig", {"preset": "magicpig"}))
    for i, (name, options) in enumerate(configs):
        torch._dynamo.reset()
        kvpass.reset()
        kv_cache = copy.deepcopy(cache) if i + 1 < len(configs) else cache  # the last one adopts the original
        kv_fwd = torch.compile(fwd, backend="kvpass", options=options)  # Inductor
        adopt, token = _steps(kv_fwd, kv_cache, first, 1)  # adopts the prefilled cache: offload + index every key
        state = {"token": token}

        def step(kv_fwd=kv_fwd, kv_cache=kv_cache, state=state):
            _, state["token"] = _steps(kv_fwd, kv_cache, state["token"], 1)

        for _ in range(WARMUP):
            step()
        if name == "defaults":
            benchmark.pedantic(step, rounds=STEPS, iterations=1)
            t_kv = benchmark.stats.stats.median
        else:
            t_kv = statistics.median(_steps(kv_fwd, kv_cache, state["token"], STEPS)[0])
        ops = _op_ms(step, ("kvpass::split_attention", "kvpass::append_kv"))  # where kvpass's time goes
        results[name] = (t_kv, adopt[0], ops, kvpass.runtime_stats())
        kv_cache = None
    t_kv, adopt_s, kv_ops, stats = results["defaults"]
    t_mp, _, mp_ops, mp_stats = results["magicpig"]
    best_dense = min(t_eager, t_compiled)
    benchmark.extra_info.update({
        "model": MODEL, "context": n, "threads": torch.get_num_threads(),
        "dense_eager_ms": round(t_eager * 1e3, 1), "dense_compiled_ms": round(t_compiled * 1e3, 1),
        "kvpass_ms": round(t_kv * 1e3, 1), "speedup_vs_best_dense": round(best_dense / t_kv, 2),
        "dense_eager_attention_ms": dense_attn, "kvpass_attention_ms": kv_ops["kvpass::split_attention"],
        "kvpass_append_ms": kv_ops["kvpass::append_kv"],
        "magicpig_ms": round(t_mp * 1e3, 1), "magicpig_attention_ms": mp_ops["kvpass::split_attention"],
        "defaults_vs_magicpig_step": round(t_kv / t_mp, 2),
        "dense_prefill_s": round(prefill_s, 1), "kvpass_offload_s": round(adopt_s, 1),
        "device_kv_bytes": stats["device_kv_bytes"], "host_kv_bytes": stats["host_kv_bytes"],
        "index_bytes": stats["index_bytes"], "projection_bytes": stats["projection_bytes"],
        "magicpig_index_bytes": mp_stats["index_bytes"] + mp_stats["projection_bytes"],
        "dense_cache_bytes": dense_bytes, "keys_read_fraction": round(stats["keys_read_fraction"], 4),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    })
    cfg = model.config  # bounded device KV: sinks + window per layer, whatever the context
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert stats["device_kv_bytes"] == 2 * cfg.num_hidden_layers * (4 + 64) * cfg.num_key_value_heads * head_dim * 4
