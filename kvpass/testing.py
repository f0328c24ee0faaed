"""Helpers for tests and benchmarks: tiny random-weight decoders of several families, greedy runs."""

from __future__ import annotations

import math
import os

import torch

from kvpass.hf import cache_kwarg, greedy


def fuzz_examples(n: int) -> int:
    """Hypothesis examples of a kernel fuzz test: n, times $KVPASS_FUZZ_SCALE (``scripts/sanitize.sh`` raises it)."""
    return n * int(os.environ.get("KVPASS_FUZZ_SCALE", "1"))


TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}


def tiny_model(family: str = "llama", **overrides):
    import transformers as tf

    torch.manual_seed(0)
    kw = {**TINY, **overrides}
    if family == "llama":
        cfg = tf.LlamaConfig(**kw)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**kw)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(head_dim=16, **kw)
    elif family == "mistral":
        cfg = tf.MistralConfig(**{"sliding_window": None, **kw})
    elif family == "gemma":
        cfg = tf.GemmaConfig(head_dim=16, **kw)
    elif family == "gemma3":  # hybrid: a sliding-window layer (window 32) then a full one
        cfg = tf.Gemma3TextConfig(head_dim=16, **{"sliding_window": 32,
                                                  "layer_types": ["sliding_attention", "full_attention"], **kw})
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=kw["vocab_size"], n_embd=kw["hidden_size"], n_layer=kw["num_hidden_layers"],
                            n_head=kw["num_attention_heads"], n_positions=kw["max_position_embeddings"],
                            bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(family)
    cfg._attn_implementation = "sdpa"
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    # random weights give near-uniform logits; scale the embeddings so that greedy choices are clear
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4.0)
    return model


class GptFastAttention(torch.nn.Module):
    """gpt-fast style: preallocated cache buffers written with `cache[:, :, pos] = k`, a bool mask."""

    def __init__(self, dim: int, n_head: int, n_kv: int, max_len: int, decomposed: bool = False):
        super().__init__()
        self.n_head, self.n_kv, self.hd, self.decomposed = n_head, n_kv, dim // n_head, decomposed
        self.wq = torch.nn.Linear(dim, dim, bias=False)
        self.wkv = torch.nn.Linear(dim, 2 * n_kv * self.hd, bias=False)
        self.wo = torch.nn.Linear(dim, dim, bias=False)
        self.register_buffer("k_cache", torch.zeros(1, n_kv, max_len, self.hd), persistent=False)
        self.register_buffer("v_cache", torch.zeros(1, n_kv, max_len, self.hd), persistent=False)

    def forward(self, x, input_pos, mask):
        B, T, _ = x.shape  # x: [B, T, dim]; input_pos: [T]; mask: [1, 1, T, max_len] bool
        q = self.wq(x).view(B, T, self.n_head, self.hd).transpose(1, 2)
        k, v = self.wkv(x).view(B, T, 2 * self.n_kv, self.hd).transpose(1, 2).split(self.n_kv, dim=1)
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        rep = self.n_head // self.n_kv
        keys = self.k_cache.repeat_interleave(rep, dim=1)
        values = self.v_cache.repeat_interleave(rep, dim=1)
        if self.decomposed:  # nanoGPT style: the attention written out
            att = (q @ keys.transpose(-2, -1)) * (1.0 / math.sqrt(self.hd))
            att = att.masked_fill(~mask, float("-inf"))
            y = torch.nn.functional.softmax(att, dim=-1) @ values
        else:
            y = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class GptFast(torch.nn.Module):
    """A two-layer gpt-fast style decoder (no positional encoding: enough to exercise the cache)."""

    def __init__(self, vocab: int = 256, dim: int = 64, n_head: int = 4, n_kv: int = 2, max_len: int = 512,
                 decomposed: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList(GptFastAttention(dim, n_head, n_kv, max_len, decomposed) for _ in range(2))
        self.out = torch.nn.Linear(dim, vocab, bias=False)
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)), persistent=False)

    def forward(self, idx, input_pos):  # idx: [B, T]; input_pos: [T]
        mask = self.causal[None, None, input_pos]
        x = self.emb(idx) * 4.0
        for layer in self.layers:
            x = x + layer(x, input_pos, mask)
        return self.out(x)


def gptfast_greedy(step, prompt, new_tokens):
    """Greedy decode with a gpt-fast style forward `step(idx, input_pos)`; returns (ids, logits)."""
    T = prompt.shape[1]
    logits = step(prompt, torch.arange(T))[:, -1]
    ids, all_logits = [logits.argmax(-1)], [logits]
    for t in range(T, T + new_tokens - 1):
        logits = step(ids[-1][:, None], torch.tensor([t]))[:, -1]
        ids.append(logits.argmax(-1))
        all_logits.append(logits)
    return torch.stack(ids, 1), torch.stack(all_logits, 1)


class NanoGPTBlock(torch.nn.Module):
    """nanoGPT style causal self-attention with no KV cache (prefill/training only)."""

    def __init__(self, dim: int = 64, n_head: int = 4):
        super().__init__()
        self.n_head = n_head
        self.c_attn = torch.nn.Linear(dim, 3 * dim)
        self.c_proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


def compile_kvpass(model, **options):

    options.setdefault("inductor", False)
    model.forward = torch.compile(model.forward, backend="kvpass", options=options)
    return model


def reference_prompt(tok, n: int) -> torch.Tensor:
    """The first ``n`` tokens of a fixed run of CPython's Language Reference chapters (pydoc_data) —
    real text, the same on every machine (the benchmarks' prompt)."""
    from kvpass.eval.text import reference_text

    text = reference_text(("assignment", "compound", "datamodel", "execmodel", "exprlists", "import"))
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :n]
    if ids.shape[1] != n:
        raise ValueError(f"the reference text has only {ids.shape[1]} tokens, {n} asked")
    return ids


class Decoder:
    """Prefill once with ``forward`` (a model's forward, compiled or not), then one greedy decode step
    per ``step()`` call (the cache grows); ``median_step`` times steps."""

    def __init__(self, model, forward, ids):
        import time

        from transformers import DynamicCache

        self.forward, self.kw = forward, {cache_kwarg(): DynamicCache(config=model.config), "use_cache": True}
        t0 = time.perf_counter()
        with torch.no_grad():
            out = forward(input_ids=ids, **self.kw)
        self.prefill_s = time.perf_counter() - t0
        self.token = out.logits[:, -1:].argmax(-1)

    def step(self):
        with torch.no_grad():
            out = self.forward(input_ids=self.token, **self.kw)
        self.token = out.logits[:, -1:].argmax(-1)

    def median_step(self, steps: int = 12, warmup: int = 3) -> float:
        import statistics
        import time

        for _ in range(warmup):
            self.step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


# ---------------------------------------------------------------- tensor parallel (torch.distributed, gloo)

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode_configs(model, ids: torch.Tensor, runs: dict, tokens: int = 12) -> dict:
    """Greedy-decode ``ids`` under each kvpass configuration of ``runs`` (name → options), each compiled
    afresh on fresh stores: {name: (token ids as a list, runtime_stats())}.  The model's forward is
    restored after each."""
    import kvpass

    fwd, out = model.forward, {}
    try:
        for name, options in runs.items():
            torch._dynamo.reset()
            kvpass.reset()
            compile_kvpass(model, **options)
            out[name] = (greedy(model, ids, tokens)[0].tolist(), kvpass.runtime_stats())
            model.forward = fwd
    finally:
        model.forward = fwd
    return out


def tp_worker(rank: int, world: int, port: int, path: str, ids: torch.Tensor, runs: dict, results,
              load: dict | None = None) -> None:
    """One tensor-parallel rank (spawned): load the model from ``path`` sharded by heads (transformers'
    ``tp_plan="auto"``, gloo), then greedy-decode ``ids`` dense and under each kvpass configuration of
    ``runs`` (name → options); put (rank, name, token ids, per-rank runtime_stats) on ``results``.
    load: more ``from_pretrained`` arguments (e.g. ``gguf_file``)."""
    import torch.distributed as dist
    import transformers as tf

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", attn_implementation="sdpa",
                                                        **(load or {})).eval()
        results.put((rank, "dense", greedy(model, ids, 12)[0].tolist(), {}))
        for name, (tokens, stats) in decode_configs(model, ids, runs).items():
            results.put((rank, name, tokens, stats))
    finally:
        dist.destroy_process_group()


def run_tensor_parallel(world: int, path: str, ids: torch.Tensor, runs: dict, timeout: float = 600,
                        load: dict | None = None) -> dict:
    """Spawn ``world`` gloo ranks of ``tp_worker``; returns {(rank, name): (token ids, runtime_stats)}."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=tp_worker, args=(r, world, port, path, ids, runs, results, load)) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(world * (len(runs) + 1)):
            rank, name, tokens, stats = results.get(timeout=timeout)
            out[rank, name] = (tokens, stats)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return out
