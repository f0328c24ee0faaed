"""One decode step of one attention layer: kvpass's CPU kernel against dense attention, same CPU, same KV.

Llama-3-8B layout: 32 query / 8 kv heads, head_dim 128 (and SmolLM2's: 9 / 3, 64), batch 1, one query
token.  kvpass stores the
KV in bf16 (sinks + window + host store with the LSH index at the MagicPIG preset, K=10, L=150,
threshold 2) and runs ``KVStore.attend(estimator="sample")`` — the tracked figure — and, beside it, a
store at the defaults (topk over the key sketch, budget 1.5%, plus the tail sample of every 100th key),
one with the sketch's int8 codes instead of the defaults' int4 (``sketch_bits=8``) and the top 2% without
a tail (the defaults before); the baselines get the same keys and values in fp32:
``F.scaled_dot_product_attention(enable_gqa=True)`` and a grouped matmul-softmax-matmul.  The
figure of merit is the ratio to the faster baseline, measured in the same test (these machines are
noisy; absolute times are not comparable across runs).  ``extra_info`` carries the ratio, the
fraction of keys read, and the kernel's effective bandwidth (bytes it must touch / time) against
this machine's copy bandwidth, and the time per row read against torch's ``index_select`` of as many
rows of the same size (a roofline for scattered reads on this machine).  For the defaults it adds their
floor: the distinct K/V rows they read (counted by the kernel: ``KVStore.last_step_reads``) gathered by
``index_select`` plus the key sketch the kernel scanned, read at the machine's copy bandwidth — no arithmetic, no ranking — and that floor's ratio to dense
(``defaults_floor_speedup_vs_best_dense``): a speed-up above it needs rows read faster than torch gathers them.

    pytest benchmarks/test_decode_attention.py --benchmark-only              # 8k, 32k, 128k
    pytest benchmarks/test_decode_attention.py --benchmark-only -k "8k and not 128k"   # quick
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from kvpass.cpu_ops import simd_level

from kvpass import KVStore

LAYOUTS = {"llama3-8b": (32, 8, 128), "smollm2": (9, 3, 64), "qwen2.5-coder-0.5b": (14, 2, 64)}  # q heads, kv heads, D
CONTEXTS = {"8k": 8192, "32k": 32768, "128k": 131072}


def best_of(fn, repeat: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def cold_best_of(fn, repeat: int, flush: torch.Tensor) -> float:
    """best_of with the caches flushed before each call (``flush``: a buffer larger than the last-level
    cache, rewritten): what a model's layer sees, whose data the other layers have evicted since its
    last step.  (best_of's repeated calls find the layer's sketch or index in a 32 MB L3.)"""
    fn()
    best = math.inf
    for _ in range(repeat):
        flush.add_(1)
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """This machine's copy bandwidth (bytes read + written per second), best of 5."""
    src = torch.empty(64 << 20, dtype=torch.float32).fill_(1.0)  # 256 MiB
    dst = torch.empty_like(src)
    return 2 * src.nbytes / best_of(lambda: dst.copy_(src), 5)


def layer(ctx: int, H: int, HKV: int, D: int):
    """Keys with a shared direction (as real keys have; it is what the index's centring is for),
    values and one query; the kvpass store filled with them."""
    gen = torch.Generator().manual_seed(ctx)
    k = torch.randn(1, HKV, ctx, D, generator=gen) + 2.0 * torch.randn(1, HKV, 1, D, generator=gen)
    v = torch.randn(1, HKV, ctx, D, generator=gen)
    q = torch.randn(1, H, 1, D, generator=gen)
    store = KVStore(HKV, D, dtype=torch.bfloat16, batch=1, preset="magicpig")
    store.append(k.bfloat16(), v.bfloat16())
    defaults = KVStore(HKV, D, dtype=torch.bfloat16, batch=1)  # topk over the key sketch
    defaults.append(k.bfloat16(), v.bfloat16())
    # the baselines read what kvpass stores (bf16-rounded), in fp32
    return q, k.bfloat16().float(), v.bfloat16().float(), store, defaults


def variant(k: torch.Tensor, v: torch.Tensor, **options) -> KVStore:
    """The defaults with ``options`` changed, filled with the same keys and values."""
    HKV, D = k.shape[1], k.shape[3]
    store = KVStore(HKV, D, dtype=torch.bfloat16, batch=1, **options)
    store.append(k.bfloat16(), v.bfloat16())
    return store


# beside the defaults: the sketch's int8 codes instead of int4, and the top 2% of the sketch without a tail
# sample (the defaults before the head + tail estimator)
VARIANTS = {"sketch_int8": {"sketch_bits": 8}, "top2pct_no_tail": {"budget": 0.02, "tail_stride": 0}}


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_decode_attention(benchmark, context, copy_bandwidth):
    """Llama-3-8B layout (the issue's target figures)."""
    run_layer(benchmark, "llama3-8b", context, copy_bandwidth)


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_decode_attention_smollm2(benchmark, context, copy_bandwidth):
    """SmolLM2-135M layout: 9 query / 3 kv heads, head_dim 64."""
    run_layer(benchmark, "smollm2", context, copy_bandwidth)


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_decode_attention_qwen(benchmark, context, copy_bandwidth):
    """Qwen2.5-Coder-0.5B layout (the model the defaults were chosen on): 14 query / 2 kv heads, head_dim 64."""
    run_layer(benchmark, "qwen2.5-coder-0.5b", context, copy_bandwidth)


def run_layer(benchmark, layout: str, context: str, copy_bandwidth: float) -> None:
    H, HKV, D = LAYOUTS[layout]
    torch.set_num_threads(torch.get_num_threads())  # fixed for the whole test
    ctx = CONTEXTS[context]
    q, k, v, store, defaults = layer(ctx, H, HKV, D)
    scale = 1 / math.sqrt(D)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def grouped():
        s = (q.view(1, HKV, H // HKV, D) @ k.transpose(-1, -2)) * scale
        return torch.softmax(s, -1) @ v

    def kvpass_sample():
        return store.attend(q, estimator="sample")

    out = kvpass_sample()
    assert torch.isfinite(out).all()
    benchmark.group = f"decode-attention-{layout}-{context}"
    benchmark.pedantic(kvpass_sample, rounds=20, iterations=1, warmup_rounds=2)
    if benchmark.disabled:  # --benchmark-disable: a smoke run (CI), no timing
        return
    t_kvpass = benchmark.stats.stats.min
    repeat = 3 if ctx > 32768 else 7
    t_sdpa, t_grouped = best_of(sdpa, repeat), best_of(grouped, repeat)
    t_kvpass = min(t_kvpass, best_of(kvpass_sample, 10))  # re-measured next to the baselines
    t_defaults = best_of(lambda: defaults.attend(q, estimator=defaults.options.estimator), 10)
    others = {name: variant(k, v, **opts) for name, opts in VARIANTS.items()}
    warm = {name: best_of(lambda s=s: s.attend(q, estimator=s.options.estimator), 10) for name, s in others.items()}
    t_int8 = warm["sketch_int8"]
    flush = torch.zeros(96 << 20, dtype=torch.uint8)
    cold = {name: cold_best_of(lambda s=s: s.attend(q, estimator=s.options.estimator), 8, flush)
            for name, s in (("sample", store), ("defaults", defaults), *others.items())}
    del flush
    baseline = min(t_sdpa, t_grouped)

    n = store.tokens_offloaded
    idx = store.index
    read = store.last_keys_read  # mean keys scored per query row
    rows = H
    itemsize = 2
    kv_bytes = rows * read * 2 * D * itemsize
    visited = rows * idx.lsh_l * n / 2 ** idx.lsh_k  # bucket entries, on average
    index_bytes = visited * 15 / 8 + rows * idx.lsh_l * 2 * 2  # ids (≤15 bits) + bucket starts
    static_bytes = 2 * HKV * (store.sink_size + store.window_size) * D * itemsize
    proj_bytes = idx.projection_bytes
    touched = kv_bytes + index_bytes + static_bytes + proj_bytes
    # a roofline for the scattered reads: torch gathering as many rows of the same size (sorted random
    # ids, as the kernel's candidates are sorted per segment) out of a buffer as large as the host store
    row_elems = 2 * D * itemsize // 4  # fp32 elements of one K+V row (512 B at d=128)
    flat = k.view(-1)[: (k.numel() // row_elems) * row_elems].view(-1, row_elems)
    n_rows = max(1, round(rows * read))
    ids = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(1))[:n_rows].sort().values
    t_gather = best_of(lambda: flat.index_select(0, ids), 5)
    # the defaults' floor: the distinct K/V rows they must read, gathered by torch as above, and their key
    # sketch (every offloaded key's codes) read at this machine's copy bandwidth (read + write bytes per
    # second: generous for a read) — no arithmetic, no ranking; a speed-up above its ratio needs rows read
    # faster than torch gathers them
    defaults.attend(q, estimator=defaults.options.estimator)
    reads = defaults.last_step_reads  # counted by the kernel: the sketch it scanned, the distinct rows it read
    distinct, chosen = reads["k_rows"], int(defaults.last_scored.sum())
    assert reads["v_rows"] == distinct and chosen / (H // HKV) <= distinct <= chosen
    ids_d = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(2))[:distinct].sort().values
    t_gather_d = best_of(lambda: flat.index_select(0, ids_d), 5)
    dense_bytes = 2 * k.nbytes  # fp32 K and V, what the baselines read
    sketch_bytes = reads["code_bytes"]  # every key's code, and the threshold's sample of 64 tiles per kv head
    rows_bytes = reads["row_bytes"]
    t_floor = t_gather_d + sketch_bytes / copy_bandwidth
    benchmark.extra_info.update({
        "layout": f"{H} q / {HKV} kv heads, d={D}",
        "context": ctx,
        "threads": torch.get_num_threads(),
        "simd": simd_level(),
        "ms_kvpass_sample": round(t_kvpass * 1e3, 3),
        "ms_kvpass_defaults": round(t_defaults * 1e3, 3),
        "defaults_vs_sample_time": round(t_defaults / t_kvpass, 2),
        **{f"ms_kvpass_{name}": round(t * 1e3, 3) for name, t in warm.items()},
        "defaults_vs_top2pct_no_tail_time": round(t_defaults / warm["top2pct_no_tail"], 2),
        "defaults_vs_top2pct_no_tail_time_cold": round(cold["defaults"] / cold["top2pct_no_tail"], 2),
        "defaults_keys_read_fraction": round(defaults.last_keys_read / n, 4),
        **{f"ms_kvpass_{name}_cold": round(t * 1e3, 3) for name, t in cold.items()},
        "defaults_vs_sample_time_cold": round(cold["defaults"] / cold["sample"], 2),
        "defaults_speedup_vs_best_dense": round(baseline / t_defaults, 2),
        "ms_sdpa_fp32": round(t_sdpa * 1e3, 3),
        "ms_grouped_fp32": round(t_grouped * 1e3, 3),
        "speedup_vs_best_dense": round(baseline / t_kvpass, 2),
        "keys_read_fraction": round(read / n, 4),
        "effective_GBps": round(touched / t_kvpass / 1e9, 2),
        "copy_GBps": round(copy_bandwidth / 1e9, 2),
        "dense_GBps": round(2 * k.nbytes / baseline / 1e9, 2),
        "ns_per_row_kvpass": round(t_kvpass / n_rows * 1e9, 1),
        "ns_per_row_torch_gather": round(t_gather / n_rows * 1e9, 1),
        "defaults_distinct_rows": distinct,
        "defaults_distinct_rows_per_chosen": round(distinct / chosen, 3),
        "defaults_bytes_vs_dense": round((rows_bytes + sketch_bytes) / dense_bytes, 4),
        "defaults_sketch_bytes_vs_dense": round(sketch_bytes / dense_bytes, 4),
        "defaults_speedup_cap_at_dense_bandwidth": round(dense_bytes / (rows_bytes + sketch_bytes), 1),
        "ms_defaults_floor": round(t_floor * 1e3, 3),
        "defaults_floor_speedup_vs_best_dense": round(baseline / t_floor, 1),
        "ns_per_distinct_row_torch_gather": round(t_gather_d / max(distinct, 1) * 1e9, 1),
        "index_bytes_per_token_per_table": round(store.index_bytes / (n * HKV * idx.lsh_l), 3),
    })
    print(f"\n{layout} {context}: kvpass sample {t_kvpass * 1e3:.2f} ms | sdpa {t_sdpa * 1e3:.2f} ms | grouped "
          f"{t_grouped * 1e3:.2f} ms | speed-up {baseline / t_kvpass:.1f}x | defaults (topk, sketch) "
          f"{t_defaults * 1e3:.2f} ms ({baseline / t_defaults:.1f}x; int8 sketch {t_int8 * 1e3:.2f} ms; top 2% without "
          f"a tail {warm['top2pct_no_tail'] * 1e3:.2f} ms) | caches flushed: sample {cold['sample'] * 1e3:.2f}, "
          f"defaults {cold['defaults'] * 1e3:.2f}, int8 sketch {cold['sketch_int8'] * 1e3:.2f}, top 2% without a tail "
          f"{cold['top2pct_no_tail'] * 1e3:.2f} ms | keys read {read / n:.2%} | "
          f"{touched / t_kvpass / 1e9:.1f} GB/s effective vs {copy_bandwidth / 1e9:.1f} GB/s copy | "
          f"{t_kvpass / n_rows * 1e9:.0f} ns per row read vs {t_gather / n_rows * 1e9:.0f} ns for torch "
          f"index_select of as many rows | defaults' floor (their {distinct} distinct rows gathered by torch + "
          f"their sketch at copy bandwidth) {t_floor * 1e3:.2f} ms = {baseline / t_floor:.1f}x dense; bytes "
          f"{(rows_bytes + sketch_bytes) / dense_bytes:.2%} of dense's (sketch {sketch_bytes / dense_bytes:.2%})")


@pytest.mark.parametrize("context", ["8k", "32k"])
def test_decode_attention_padded_batch(benchmark, context):
    """A left-padded batch of four sequences (100%, 90%, 80% and 70% of the context) in one store, at the
    defaults, against the same four sequences in four stores of one row each (SmolLM2 layout).  The
    padding is never attended and each row keeps its share of its own keys, so the batch should cost
    about the four singles together: ``batch_vs_four_singles`` (issue target ≤ 1.3)."""
    H, HKV, D = LAYOUTS["smollm2"]
    ctx = CONTEXTS[context]
    lengths = [ctx, ctx * 9 // 10, ctx * 8 // 10, ctx * 7 // 10]
    gen = torch.Generator().manual_seed(ctx)
    k = (torch.randn(4, HKV, ctx, D, generator=gen) + 2.0 * torch.randn(4, HKV, 1, D, generator=gen)).bfloat16()
    v = torch.randn(4, HKV, ctx, D, generator=gen).bfloat16()
    q = torch.randn(4, H, 1, D, generator=gen)
    pad = torch.tensor([ctx - n for n in lengths])
    batch = KVStore(HKV, D, dtype=torch.bfloat16, batch=4)
    batch.append(k, v)
    singles = []
    for b, n in enumerate(lengths):
        s = KVStore(HKV, D, dtype=torch.bfloat16, batch=1)
        s.append(k[b:b + 1, :, ctx - n:], v[b:b + 1, :, ctx - n:])
        singles.append(s)

    def padded():
        return batch.attend(q, row_pad=pad)

    def four():
        return [s.attend(q[b:b + 1]) for b, s in enumerate(singles)]

    out = padded()
    assert torch.isfinite(out).all()
    benchmark.group = f"decode-attention-padded-{context}"
    benchmark.pedantic(padded, rounds=20, iterations=1, warmup_rounds=2)
    if benchmark.disabled:
        return
    t_batch = min(benchmark.stats.stats.min, best_of(padded, 10))
    t_four = best_of(four, 10)
    scored = batch.last_scored.float().mean((1, 2))  # per row, from the last padded() call
    four()
    alone = torch.stack([s.last_scored.float().mean() for s in singles])
    benchmark.extra_info.update({
        "context": ctx, "lengths": lengths, "threads": torch.get_num_threads(),
        "ms_batch": round(t_batch * 1e3, 3), "ms_four_singles": round(t_four * 1e3, 3),
        "batch_vs_four_singles": round(t_batch / t_four, 2),
        "keys_scored_batch_vs_alone": [round(float(x), 3) for x in scored / alone],
    })
    print(f"\npadded batch {context}: {t_batch * 1e3:.2f} ms vs four singles {t_four * 1e3:.2f} ms "
          f"({t_batch / t_four:.2f}x); keys scored per row vs alone {[round(float(x), 3) for x in scored / alone]}")
