"""The long-document workflow measured on an installed model (docs/contexts.md): forks of one prefix in
exact mode against dense, the memory of N forks against one prefix, save / load / memory-mapped load
against the prefill, and the decode step from a loaded context (in memory, mapped warm, mapped cold).

    python scripts/measure_contexts.py --model qwen2.5-coder-0.5b --context 16384 --exact-check --forks 8
    python scripts/measure_contexts.py --model qwen2.5-coder-0.5b --context 32768 --save /tmp/ctx32k
    python scripts/measure_contexts.py --model qwen2.5-coder-0.5b --context 32768 --load /tmp/ctx32k

Every figure is printed as it is measured (one line each), then as JSON.  Prompts are the Python Language
Reference (``kvpass.eval.text``); answers are greedy.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import statistics
import time

import torch

import kvpass
from kvpass.eval.text import DEFAULT_QUESTIONS, document_and_questions
from kvpass.hf import cache_kwarg, greedy

OUT: dict = {}


def note(key: str, value, text: str) -> None:
    OUT[key] = value
    print(f"{key}: {text}", flush=True)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def hf_prefill(model, ids):
    """Hugging Face's pattern: one forward of the prefix into a DynamicCache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(ids, **{cache_kwarg(): cache}, logits_to_keep=1)
    return cache, time.perf_counter() - t0


def answer(model, doc, q_ids, cache, new):
    ids = torch.cat([doc, q_ids], 1)
    steps = []

    class Clock:
        def __call__(self, input_ids, scores):
            steps.append(time.perf_counter())
            return scores

    from transformers import LogitsProcessorList

    with torch.no_grad():
        out, _ = greedy(model, ids, new, **{cache_kwarg(): cache}, logits_processor=LogitsProcessorList([Clock()]))
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    return out[0, ids.shape[1]:].tolist(), statistics.median(gaps) if gaps else float("nan")


def drop_page_cache(folder: str) -> None:
    """Drop the context file's pages from the page cache (those no process maps)."""
    fd = os.open(os.path.join(folder, "context.safetensors"), os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def loaded_steps(model, doc, q_ids, folder, new, prefill_s=None, live_tokens=None, live_step=None) -> None:
    """Load the context three ways and answer the same question from each: in memory; memory-mapped warm
    (the file in the page cache: verifying it has just read it); memory-mapped cold (the file's pages
    dropped after loading, so the rows a step reads come from the disk)."""
    steps, tokens = ({"live": live_step} if live_step else {}), {}
    for how in ("memory", "mmap", "mmap_cold"):
        kvpass.reset()
        gc.collect()
        t0 = time.perf_counter()
        loaded = kvpass.load_context(folder, model, mmap=how != "memory")
        s = time.perf_counter() - t0
        frac = f" = {s / prefill_s:.2%} of the prefill" if prefill_s else ""
        note(f"load_{how}_s", s, f"{s:.2f} s to load ({how}){frac}")
        if how == "mmap_cold":
            drop_page_cache(folder)
        tokens[how], steps[how] = answer(model, doc, q_ids, copy.deepcopy(loaded), new)
        del loaded
    ref = live_tokens if live_tokens is not None else tokens["memory"]
    same = {k: v == ref for k, v in tokens.items()}
    note("same_tokens", same, f"each loaded context's answer equals the {'live' if live_tokens else 'in-memory'} "
                              f"one's: {same}")
    note("step_ms", {k: v * 1e3 for k, v in steps.items()},
         ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in steps.items()) + " (median decode step)")
    note("mmap_over_memory", steps["mmap"] / steps["memory"],
         f"warm mapped step / in-memory step: {steps['mmap'] / steps['memory']:.3f}x")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--exact-check", action="store_true", help="forks in exact mode against dense, token for token")
    p.add_argument("--forks", type=int, default=0, help="memory of N forks (at the defaults) against one prefix")
    p.add_argument("--save", metavar="DIR", help="save the prefix there, load it back (memory, mmap), time the step")
    p.add_argument("--load", metavar="DIR", help="only load a context saved by --save (same model, --context) "
                   "three ways and time the step; no prefill")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = kvpass.load_model(args.model)
    doc, questions = document_and_questions(tok, list(DEFAULT_QUESTIONS), n_tokens=args.context)
    note("setup", {"model": args.model, "context": doc.shape[1], "threads": args.threads, "load": os.getloadavg()[0]},
         f"{args.model}, a {doc.shape[1]}-token document, {args.threads} threads, load {os.getloadavg()[0]:.2f}")
    forward = model.forward
    if args.load:
        model.forward = torch.compile(forward, backend="kvpass")
        kvpass.reset()
        answer(model, doc, questions[1][1], kvpass.load_context(args.load, model), 4)  # compile first
        loaded_steps(model, doc, questions[0][1], args.load, args.new_tokens)
        print(json.dumps(OUT, indent=1))
        return

    if args.exact_check:
        cache, _ = hf_prefill(model, doc)
        dense = [answer(model, doc, q, copy.deepcopy(cache), args.new_tokens)[0] for _, q in questions]
        del cache
        model.forward = torch.compile(forward, backend="kvpass", options={"estimator": "exact"})
        kvpass.reset()
        cache, _ = hf_prefill(model, doc)
        forked = [answer(model, doc, q, copy.deepcopy(cache), args.new_tokens)[0] for _, q in questions]
        same = [a == b for a, b in zip(forked, dense)]
        note("exact_forks_equal_dense", same, f"{sum(same)}/{len(same)} questions: the forks' tokens equal dense's")
        del cache
        model.forward = forward
        torch._dynamo.reset()

    model.forward = torch.compile(forward, backend="kvpass")
    kvpass.reset()
    cache, prefill_s = hf_prefill(model, doc)
    note("prefill_s", prefill_s, f"{prefill_s:.1f} s (one forward, kvpass defaults, incl. compilation)")
    one = kvpass.runtime_stats()
    note("one_prefix", {"host_kv_bytes": one["host_kv_bytes"], "index_bytes": one["index_bytes"]},
         f"host KV {one['host_kv_bytes'] / 2**20:.1f} MiB, index {one['index_bytes'] / 2**20:.1f} MiB")
    if args.forks:
        warm = [copy.deepcopy(cache) for _ in questions]  # compile every graph a fork runs, then drop them:
        for f, (_, q) in zip(warm, questions):             # the RSS below is the forks', not the compiler's
            answer(model, doc, q, f, 4)
        del warm, f
        gc.collect()
        rss_before = rss_mib()
        forks = [copy.deepcopy(cache) for _ in range(args.forks)]
        for i, f in enumerate(forks):  # each fork takes a question and a few answer tokens
            answer(model, doc, questions[i % len(questions)][1], f, 4)
        many, added = kvpass.runtime_stats(), rss_mib() - rss_before
        held = (one["host_kv_bytes"] + one["index_bytes"]) / 2**20
        ratio = (many["host_kv_bytes"] + many["index_bytes"]) / 2**20 / held
        note("forks", {"n": args.forks, "host_kv_bytes": many["host_kv_bytes"], "index_bytes": many["index_bytes"],
                       "ratio_stats": ratio, "rss_added_mib": added, "ratio_rss": (held + added) / held},
             f"{args.forks} forks + the prefix: host KV + index {ratio:.3f}x one prefix's (runtime_stats); the "
             f"forks added {added:.0f} MiB of RSS (every graph compiled before): {(held + added) / held:.3f}x")
        del forks
    if args.save:
        t0 = time.perf_counter()
        kvpass.save_context(cache, args.save, model)
        note("save_s", time.perf_counter() - t0, f"{time.perf_counter() - t0:.1f} s to save")
        size = sum(f.stat().st_size for f in os.scandir(args.save))
        note("file_mib", size / 2**20, f"{size / 2**20:.0f} MiB on disk")
        live_tokens, live_step = answer(model, doc, questions[0][1], copy.deepcopy(cache), args.new_tokens)
        del cache
        loaded_steps(model, doc, questions[0][1], args.save, args.new_tokens, prefill_s, live_tokens, live_step)
    print(json.dumps(OUT, indent=1))


if __name__ == "__main__":
    main()
