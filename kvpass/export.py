"""ONNX export of the kvpass decode step, and a greedy driver for onnxruntime.

``export_onnx(model, path, context_len=...)`` exports one decode step of a Hugging Face decoder
*after the kvpass rewrite*: the model is captured with ``torch.export`` (its KV cache fed from graph
inputs), every ``aten.scaled_dot_product_attention`` over a growing cache is found (walking back
through the GQA repeat to the cache's ``cat``) and replaced by ``kvpass::decode_step`` — the split
attention with its state explicit (``kvpass.lowering.decode_step``) — and the graph goes to
``torch.onnx.export(..., dynamo=True)``.  The ONNX model's interface:

    inputs   input_ids [B, 1] int64, position [] int64 (the new token's absolute position), then per
             layer i: static_k.i, static_v.i, host_k.i, host_v.i, codes.i, mu.i
    outputs  logits [B, 1, V], then per layer i the state after the step: static_k.i, static_v.i,
             host_k.i, host_v.i, codes.i  (host tensors one token longer; mu does not change)

Prefill stays in PyTorch (dense, the model's own attention) and hands its KV over as that state
(``prefill_state``); ``onnx_generate`` then decodes greedily in onnxruntime.

Two translations of the step (``options["onnx_lsh"]``):
  "portable"  the node decomposed into standard ONNX ops (any onnxruntime, any provider; retrieval is
              dense in cost); host tensors grow by one token per step, as above.
  "custom"    one ``kvpass.DecodeStep`` node per layer (custom domain ``kvpass``), computed by kvpass's
              onnxruntime op library (``cpu_ops/ort``; ``onnx_session`` registers it) at sparse cost.
              Host tensors are fixed-capacity buffers [B, Hkv, CAP, ·] whose first
              N = position − S − W rows are used (the "capacity" layout); ``OnnxDecoder`` binds each
              state output to its input's buffer, so a step writes one row in place.
"""

from __future__ import annotations

import json
import logging
import operator
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from kvpass.lowering.decode_step import (
    EXPORT_ESTIMATORS,
    decode_step,
    decode_step_capacity,
    onnx_decode_step,
)
from kvpass.lowering.reference import MIN_KEYS, logp_table
from kvpass.runtime.config import Options, parse_options
from kvpass.runtime.lsh import projection
from kvpass.sites import analyse

log = logging.getLogger("kvpass")

STATE = ("static_k", "static_v", "host_k", "host_v", "codes", "mu")
UPDATED = STATE  # mu too: the step that offloads the min_keys-th token builds the index
# how the host tensors travel: "grow" — exactly the N host tokens, outputs one longer (portable);
# "capacity" — fixed buffers, the first N = position − S − W rows used, updated in place when the caller
# binds outputs to inputs (custom)
LAYOUT = {"portable": "grow", "custom": "capacity"}


class ExportError(RuntimeError):
    """A model or option kvpass cannot export, with the reason."""


# ---------------------------------------------------------------- state handover

def store_state(store) -> dict[str, torch.Tensor]:
    """The explicit state of one runtime ``KVStore`` (see ``kvpass.lowering.decode_step``), as CPU tensors,
    at any length: before the index is built (fewer than min_keys tokens offloaded) codes and μ are zeros
    (the step reads every host key then, and builds them when the min_keys-th token is offloaded)."""
    S, W = store.sink_size, store.window_size
    if store.index.sketch:
        raise ExportError(f"kvpass: the exported decode step carries the LSH index; this store keeps the key "
                          f"sketch (retriever {store.options.index!r}, estimator 'topk'), which cannot be exported yet")
    if store.tokens_offloaded != max(0, store.length - S - W):
        raise ExportError(f"kvpass: the exported decode step needs a full window; this store's window holds "
                          f"{store.length - S - store.tokens_offloaded} of {W} tokens (a cropped sequence)")
    B, Hkv, D = store.batch, store.num_kv_heads, store.head_dim
    if store.tokens_offloaded:
        ks, vs = store.host.views()
        host_k, host_v = torch.cat(ks, 2).cpu(), torch.cat(vs, 2).cpu()
    else:
        host_k = host_v = store.static_k.new_zeros(B, Hkv, 0, D).cpu()
    idx = store.index
    built = idx.built
    codes = idx.codes(host_k).cpu() if built else torch.zeros(B, Hkv, host_k.shape[2], idx.lsh_l, dtype=torch.int32)
    mu = idx.mu.float().cpu().clone() if built else torch.zeros(B, Hkv, D)
    return {"static_k": store.static_k.cpu().clone(), "static_v": store.static_v.cpu().clone(),
            "host_k": host_k, "host_v": host_v, "codes": codes, "mu": mu}  # copies: the store keeps changing


def prefill_state(model, input_ids: torch.Tensor, options: dict[str, Any] | Options | None = None,
                  sites: list[str] | None = None) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Run the prompt through ``model`` (dense, eager, in PyTorch) and hand its KV over as the exported
    step's state: (logits of the last prompt token [B, V], per-layer state dicts).  The state is built by
    the runtime ``KVStore`` itself, so it is what the compiled path would hold after the same prompt."""
    from transformers import DynamicCache

    from kvpass.hf import cache_kwarg
    from kvpass.runtime import KVStore

    opts = parse_options(options)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=input_ids, use_cache=True, **{cache_kwarg(): cache})
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    sites = sites or [f"model.layers.{i}.self_attn" for i in range(len(layers))]
    states = []
    for (k, v), site in zip(layers, sites):
        store = KVStore(k.shape[1], k.shape[3], options=opts, dtype=k.dtype, site=site)
        store.append(k.detach().cpu(), v.detach().cpu())
        states.append(store_state(store))
    return out.logits[:, -1].float(), states


# ---------------------------------------------------------------- capture and rewrite

class _DecodeStep(torch.nn.Module):
    """One decode step of a Hugging Face decoder with its per-layer state as flat tensor arguments.  The
    model's cache is fed the static ring as its "past", so its graph holds, per layer, the pattern the
    rewrite looks for: cat(past, new) → (GQA repeat) → SDPA.  Before the rewrite the graph is not the
    kvpass step (it attends the ring only); after it, every such SDPA is ``kvpass::decode_step``."""

    def __init__(self, model, n_layers: int):
        super().__init__()
        self.model, self.n_layers = model, n_layers

    def forward(self, input_ids, position, *state):
        from transformers import DynamicCache

        from kvpass.hf import cache_kwarg

        cache = DynamicCache(config=self.model.config)
        n = len(STATE)
        for i in range(self.n_layers):
            cache.update(state[n * i], state[n * i + 1], i)
        pos = position.reshape(1, 1).expand(input_ids.shape[0], 1)
        out = self.model(input_ids=input_ids, position_ids=pos, use_cache=True, **{cache_kwarg(): cache})
        return (out.logits, *[state[n * i + j] for i in range(self.n_layers) for j in range(len(UPDATED))])


def _state_input(n: fx.Node, state_nodes: dict[fx.Node, int]) -> int | None:
    """The index of the state placeholder that the cache's past was read from (through the cache's own
    cat/detach of an empty tensor), or None."""
    seen, todo = set(), [n]
    found = set()
    while todo:
        x = todo.pop()
        if x in seen or not isinstance(x, fx.Node):
            continue
        seen.add(x)
        if x in state_nodes:
            found.add(state_nodes[x])
        elif x.op == "call_function":
            todo.extend(x.all_input_nodes)
    return found.pop() if len(found) == 1 else None


@dataclass
class ExportInfo:
    """What ``export_onnx`` produced."""
    path: Path
    layers: int
    sites: list[str]
    estimator: str
    onnx_lsh: str
    input_names: list[str]
    output_names: list[str]
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)


def rewrite_decode_graph(gm: fx.GraphModule, n_layers: int, opts: Options) -> list[str]:
    """Replace every attention site (``kvpass.sites``, the compile pass's matcher) by ``kvpass::decode_step``;
    the graph's state outputs become the op's updated state.  Returns the site names, by layer."""
    g = gm.graph
    ph = [n for n in g.nodes if n.op == "placeholder"]
    position = ph[1]
    state_nodes = {n: j for j, n in enumerate(ph[2:])}
    n_state = len(STATE)
    done: dict[int, tuple[str, list[fx.Node]]] = {}
    gm.register_buffer("kvpass_logp", logp_table(opts.lsh_k, opts.lsh_l, opts.lsh_threshold))
    for site in analyse(gm, opts, root="model"):
        rep = site.report
        if not (rep.rewritten and rep.phase == "decode" and rep.cache == "growing"):
            raise ExportError(f"kvpass: attention {rep.name} cannot be exported as a kvpass decode step over a "
                              f"growing KV cache: {rep.reason or rep.phase}")
        k_past, v_past = site.k.past, site.v.past
        jk, jv = _state_input(k_past, state_nodes), _state_input(v_past, state_nodes)
        if jk is None or jv is None or jk % n_state != 0 or jv != jk + 1:
            raise ExportError(f"kvpass: could not trace attention {rep.name}'s cache back to one layer's state")
        layer = jk // n_state
        if layer in done:
            raise ExportError(f"kvpass: two attentions read layer {layer}'s cache")
        Hkv, D = site.k.new.meta["val"].shape[1], site.q_val.shape[-1]
        proj_name = f"kvpass_proj_{layer}"
        gm.register_buffer(proj_name, projection(opts.seed, rep.name, Hkv, D, opts.lsh_k, opts.lsh_l, "cpu").float())
        st = ph[2 + layer * n_state: 2 + (layer + 1) * n_state]
        with g.inserting_before(site.sdpa):
            proj = g.get_attr(proj_name)
            logp = g.get_attr("kvpass_logp")
            op = decode_step_capacity if opts.onnx_lsh == "custom" else decode_step
            call = g.call_function(op._opoverload, (
                site.q, site.k.new, site.v.new, *st, proj, logp, position, opts.sink_size, opts.window_size,
                opts.lsh_k, opts.lsh_threshold, opts.estimator, site.scale, MIN_KEYS))
            outs = [g.call_function(operator.getitem, (call, j)) for j in range(1 + len(UPDATED))]
        site.sdpa.replace_all_uses_with(outs[0])
        g.erase_node(site.sdpa)
        done[layer] = (rep.name, outs[1:])
    if sorted(done) != list(range(n_layers)):
        missing = sorted(set(range(n_layers)) - set(done))
        raise ExportError(f"kvpass: no exportable attention found for layers {missing}")
    out_node = next(n for n in g.nodes if n.op == "output")
    flat = list(out_node.args[0])
    for layer, (_, new) in done.items():
        for j in range(len(UPDATED)):
            flat[1 + layer * len(UPDATED) + j] = new[j]
    out_node.args = (type(out_node.args[0])(flat),)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return [done[i][0] for i in range(n_layers)]


def _check_model(model) -> int:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "num_hidden_layers"):
        raise ExportError("kvpass: export_onnx takes a Hugging Face causal LM (a model with a .config)")
    if getattr(cfg, "sliding_window", None) or "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        raise ExportError("kvpass: the exported step attends every token (causal); this model uses "
                          "sliding-window attention, which the export does not reproduce")
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in (None, "sdpa"):
        raise ExportError(f"kvpass: export needs attn_implementation='sdpa' (the model uses {impl!r})")
    return cfg.num_hidden_layers


def example_state(model, context_len: int, opts: Options, batch: int = 1) -> list[dict[str, torch.Tensor]]:
    """Random state of the right shapes for tracing (``context_len`` tokens, all but S + W on the host)."""
    cfg = model.config
    Hkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    S, W = opts.sink_size, opts.window_size
    n = context_len - S - W
    return [{"static_k": torch.randn(batch, Hkv, S + W, D, dtype=dtype),
             "static_v": torch.randn(batch, Hkv, S + W, D, dtype=dtype),
             "host_k": torch.randn(batch, Hkv, n, D, dtype=dtype),
             "host_v": torch.randn(batch, Hkv, n, D, dtype=dtype),
             "codes": torch.randint(0, 1 << opts.lsh_k, (batch, Hkv, n, opts.lsh_l), dtype=torch.int32),
             "mu": torch.zeros(batch, Hkv, D)} for _ in range(cfg.num_hidden_layers)]


def flat_inputs(input_ids: torch.Tensor, position: int | torch.Tensor,
                states: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    return (input_ids, torch.as_tensor(position, dtype=torch.int64),
            *[s[name] for s in states for name in STATE])


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "position"] + [f"{name}.{i}" for i in range(n_layers) for name in STATE]
    outputs = ["logits"] + [f"{name}.{i}.out" for i in range(n_layers) for name in UPDATED]
    return inputs, outputs


def export_program(model, *, context_len: int, options: dict[str, Any] | Options | None = None,
                   ) -> tuple[torch.export.ExportedProgram, list[str]]:
    """The rewritten decode step as a ``torch.export`` program (kvpass ops decomposed into standard
    torch ops for ``onnx_lsh="portable"``), and the site names by layer."""
    opts = parse_options(options)
    onnx_lsh = opts.onnx_lsh
    if opts.estimator not in EXPORT_ESTIMATORS:
        raise ExportError(f"kvpass: estimator {opts.estimator!r} cannot be exported yet; one of "
                          f"{list(EXPORT_ESTIMATORS)} (e.g. options={{'preset': 'magicpig'}} exports "
                          f"LSH sampling)")
    n_layers = _check_model(model)
    dtype = next(model.parameters()).dtype
    if onnx_lsh == "custom" and dtype != torch.float32:
        raise ExportError(f"kvpass: the onnxruntime op library (onnx_lsh='custom') computes float32 state; "
                          f"this model is {dtype} (export a float32 copy: model.float())")
    if onnx_lsh == "custom" and opts.lsh_k > 15:
        raise ExportError(f"kvpass: onnx_lsh='custom' stores the codes as int16: lsh_k <= 15 (got {opts.lsh_k})")
    min_ctx = opts.sink_size + opts.window_size + 256
    if context_len < min_ctx:
        raise ExportError(f"kvpass: context_len must be >= sink_size + window_size + 256 = {min_ctx} (the "
                          f"exported step runs with the window full and the LSH index built)")
    states = example_state(model, context_len, opts)
    if onnx_lsh == "custom":
        states = with_capacity(states, 16)  # the step writes host row N: free rows, int16 codes
    args = flat_inputs(torch.zeros(1, 1, dtype=torch.int64), context_len, states)
    host = torch.export.Dim("host_len", min=256, max=1 << 24)
    dyn = (None, None, tuple({2: host} if name in ("host_k", "host_v", "codes") else None
                             for _ in range(n_layers) for name in STATE))
    step = _DecodeStep(model, n_layers).eval()
    with torch.no_grad():
        ep = torch.export.export(step, args, dynamic_shapes=dyn, strict=False)
        gm = ep.module()
        sites = rewrite_decode_graph(gm, n_layers, opts)
        ep = torch.export.export(gm, args, dynamic_shapes=(None, None, *dyn[2]), strict=False)
    if onnx_lsh == "portable":
        from kvpass.lowering.decode_step import decode_step_reference

        ep = ep.run_decompositions({decode_step._opoverload: decode_step_reference})
    return ep, sites


def export_onnx(model, path: str | Path, *, context_len: int, options: dict[str, Any] | None = None,
                check: bool = True, optimize: bool = False) -> ExportInfo:
    """Export the kvpass decode step of ``model`` to ONNX at ``path`` (weights as external data next to
    it when large).  ``context_len`` is the example context the graph is traced at (≥ S + W + 256); the
    exported model accepts any host length.  options: kvpass options (estimator "exact" | "sample" |
    "none", sink_size, window_size, lsh_*, seed; ``onnx_lsh``: "portable", standard ONNX ops only, or
    "custom", kvpass.DecodeStep nodes for the op library — float32 models only).
    optimize: run the ONNX exporter's graph optimiser (SmolLM2: export 77 s instead of 30 s, the
    onnxruntime step ~10% faster — onnxruntime optimises the graph itself at load)."""
    import onnx

    opts = parse_options(options)
    t0 = time.perf_counter()
    ep, sites = export_program(model, context_len=context_len, options=opts)
    n_layers = len(sites)
    inputs, outputs = io_names(n_layers)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {decode_step_capacity._opoverload: onnx_decode_step} if opts.onnx_lsh == "custom" else None
    prog = torch.onnx.export(ep, (), dynamo=True, input_names=inputs, output_names=outputs, verbose=False,
                             optimize=optimize, custom_translation_table=table)
    prog.save(str(path), external_data=True)
    proto = onnx.load(str(path), load_external_data=False)
    meta = {"options": json.loads(opts.to_op_string()) | {"estimator": opts.estimator, "onnx_lsh": opts.onnx_lsh},
            "sites": sites, "layers": n_layers, "layout": LAYOUT[opts.onnx_lsh]}
    onnx.helper.set_model_props(proto, {"kvpass": json.dumps(meta)})
    onnx.save(proto, str(path))
    if check:
        onnx.checker.check_model(str(path))
    info = ExportInfo(path, n_layers, sites, opts.estimator, opts.onnx_lsh, inputs, outputs,
                      time.perf_counter() - t0, json.loads(opts.to_op_string()))
    log.info("kvpass: exported %d-layer decode step to %s in %.1f s", n_layers, path, info.seconds)
    return info


# ---------------------------------------------------------------- running an exported step

def _meta(session) -> dict[str, Any]:
    meta = session.get_modelmeta().custom_metadata_map
    if "kvpass" not in meta:
        raise ExportError("kvpass: this ONNX model was not exported by kvpass.export_onnx (no kvpass metadata)")
    return json.loads(meta["kvpass"])


def onnx_session(path: str | Path, *, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` (CPU) for a model written by ``export_onnx``, with the kvpass
    op library registered when the model needs it (``onnx_lsh="custom"``).  threads: intra-op threads
    (default: onnxruntime's)."""
    import onnx
    import onnxruntime as ort

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if "kvpass" in props and json.loads(props["kvpass"]).get("layout") == "capacity":
        from kvpass.cpu_ops import ort_library_path

        so.register_custom_ops_library(ort_library_path())
        # the op's OpenMP threads share the cores with onnxruntime's pool, whose idle threads would
        # otherwise spin through the op (SmolLM2 at 8k: 172 -> 92 ms a step)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def with_capacity(states: list[dict[str, torch.Tensor]], spare: int) -> list[dict[str, torch.Tensor]]:
    """The state in the capacity layout: host tensors followed by ``spare`` free rows, codes as int16."""
    pad = {"host_k", "host_v", "codes"}
    out = []
    for st in states:
        new = {k: torch.cat([v, v.new_zeros(*v.shape[:2], spare, v.shape[3])], 2) if k in pad else v
               for k, v in st.items()}
        new["codes"] = new["codes"].to(torch.int16)
        out.append(new)
    return out


class OnnxDecoder:
    """Runs an exported kvpass step in onnxruntime, carrying its state between steps.

    ``states``: the per-layer state after ``position`` tokens (``prefill_state``).  For a "capacity"
    model (onnx_lsh="custom") the host buffers get ``spare`` free rows — the number of steps it can
    run — and every state output is bound to its input's buffer, so the op library updates the state in
    place; a "grow" model (portable) gets each step's outputs fed back as the next inputs."""

    def __init__(self, session, states: list[dict[str, torch.Tensor]], position: int, *, spare: int = 64):
        import onnxruntime as ort

        meta = _meta(session)
        self.session, self.position, self.layers = session, position, meta["layers"]
        opts = parse_options(meta["options"])
        self.static_len = opts.sink_size + opts.window_size  # host rows in use = max(0, position - static_len)
        self.capacity = meta.get("layout", "grow") == "capacity"
        inputs, self.outputs = io_names(self.layers)
        if self.capacity:
            states = with_capacity(states, spare)
            self.steps_left = spare
        flat = flat_inputs(torch.zeros(1, 1, dtype=torch.int64), position, states)[2:]
        self.feed = {n: t.contiguous().numpy() for n, t in zip(inputs[2:], flat)}
        if self.capacity:
            self.binding = session.io_binding()
            self.binding.bind_output("logits")  # first: get_outputs() lists outputs in binding order
            self.values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.feed.items()}
            for n, v in self.values.items():
                self.binding.bind_ortvalue_input(n, v)
                if f"{n}.out" in self.outputs:
                    self.binding.bind_ortvalue_output(f"{n}.out", v)  # in place

    def step(self, token: int) -> torch.Tensor:
        """Feed ``token`` at the current position; returns the next-token logits [V] (fp32)."""
        ids = torch.tensor([[token]], dtype=torch.int64).numpy()
        pos = torch.tensor(self.position, dtype=torch.int64).numpy()
        if self.capacity:
            if self.steps_left == 0:
                raise ExportError("kvpass: the host buffers are full; make the OnnxDecoder with a larger spare")
            self.binding.bind_cpu_input("input_ids", ids)
            self.binding.bind_cpu_input("position", pos)
            self.session.run_with_iobinding(self.binding)
            logits = self.binding.get_outputs()[0].numpy()
            self.steps_left -= 1
        else:
            self.feed["input_ids"], self.feed["position"] = ids, pos
            res = self.session.run(None, self.feed)
            for name, val in zip(self.outputs[1:], res[1:]):
                self.feed[name[:-len(".out")]] = val
            logits = res[0]
        self.position += 1
        return torch.from_numpy(logits[0, -1].copy())

    def state(self, layer: int) -> dict[str, torch.Tensor]:
        """Layer ``layer``'s current state (the used host rows only; codes int32), as torch tensors (copies)."""
        src = self.values if self.capacity else None
        st = {}
        for name in STATE:
            key = f"{name}.{layer}"
            arr = src[key].numpy() if src is not None else self.feed[key]
            st[name] = torch.from_numpy(arr.copy())
        if self.capacity:
            n = max(0, self.position - self.static_len)
            for name in ("host_k", "host_v", "codes"):
                st[name] = st[name][:, :, :n]
            st["codes"] = st["codes"].to(torch.int32)
        return st


def onnx_generate(session, tokenizer, prompt, *, model, max_new_tokens: int = 32,
                  progress: bool = False) -> tuple[list[int], str]:
    """Greedy decoding with an exported kvpass step in onnxruntime.  The prompt is prefilled in PyTorch
    by ``model`` (dense, the model's own attention) and its KV handed over as the step's state; every
    generated token after the first is computed by ``session`` (see ``OnnxDecoder``).  ``prompt``: text
    (the tokenizer's chat template is not applied) or token ids [1, T].  Returns (new token ids, text)."""
    meta = _meta(session)
    opts = parse_options(meta["options"])
    ids = tokenizer(prompt, return_tensors="pt").input_ids if isinstance(prompt, str) else prompt
    logits, states = prefill_state(model, ids, opts, meta["sites"])
    dec = OnnxDecoder(session, states, ids.shape[1], spare=max(max_new_tokens, 1))
    tokens = [int(logits[0].argmax())]
    steps = range(max_new_tokens - 1)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="onnxruntime decode", unit="tok")
    eos = getattr(tokenizer, "eos_token_id", None)
    for _ in steps:
        if tokens[-1] == eos:
            break
        tokens.append(int(dec.step(tokens[-1]).argmax()))
    return tokens, tokenizer.decode(tokens)
