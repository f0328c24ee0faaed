"""The FX pass: detect every attention site in a Dynamo graph, decide what to do with it, rewrite it.

detect  — each ``F.scaled_dot_product_attention`` node; walking back from its K/V through the GQA
          repeat (``repeat_kv``'s getitem/unsqueeze → expand → reshape, or ``repeat_interleave``) to the
          KV-cache update that produced them.  Cache updates are a table of recognisers (patterns are
          data, the matcher is generic); the dataflow is a networkx view of the FX graph.
decide  — prefill vs decode from the symbolic shapes (sympy): a growing cache whose past length is
          the constant 0 is a prefill; a static-int query block no longer than the window is a
          decode/verify step; anything the split cannot reproduce exactly stays dense, with a reason.
rewrite — decode: append_kv → split_attention (static part + CPU part + LSE merge), and the model's
          cache receives placeholders; prefill: the model's SDPA stays, the prompt's KV is offloaded.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx
import sympy
import torch
from torch import fx

from kvpass import ops
from kvpass.options import Options
from kvpass.report import Report, SiteReport

SDPA_TARGETS = {torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SUPPORTED_DTYPES = {torch.float32, torch.bfloat16, torch.float16}


class UnsupportedSite(RuntimeError):
    """Raised for a site kvpass must handle but cannot, or any unmatched site under on_unmatched="error"."""


# ---------------------------------------------------------------- the dataflow view

def dataflow(graph: fx.Graph) -> nx.DiGraph:
    """Producer → consumer edges between FX nodes, each node tagged with its program order."""
    g = nx.DiGraph()
    for i, n in enumerate(graph.nodes):
        g.add_node(n, order=i)
        for src in n.all_input_nodes:
            g.add_edge(src, n)
    return g


def _val(n) -> torch.Tensor | None:
    v = n.meta.get("example_value") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _expr(x) -> sympy.Expr:
    """A size as a sympy expression (SymInt → its symbolic expression)."""
    return x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))


def _static_int(x) -> int | None:
    e = _expr(x)
    return int(e) if e.is_number else None


# ---------------------------------------------------------------- the GQA repeat

def _is_head_repeat(n: fx.Node) -> bool:
    """One step of a repeat of kv heads that maps query head h to kv head h // G."""
    if n.op == "call_method" and n.target in ("expand", "reshape", "view", "contiguous"):
        return True
    if n.op == "call_method" and n.target == "repeat_interleave":
        return n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else None) == 1
    if n.op == "call_function" and n.target is torch.repeat_interleave:
        return n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else None) == 1
    if n.op == "call_method" and n.target == "unsqueeze" or n.op == "call_function" and n.target is torch.unsqueeze:
        return (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")) == 2
    if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], tuple):
        idx = n.args[1]  # x[:, :, None, :, :] — new axis right after the head axis
        return (len(idx) >= 3 and idx[2] is None
                and all(i == slice(None) or i is Ellipsis for j, i in enumerate(idx) if j != 2))
    return False


def strip_repeat(flow: nx.DiGraph, kv: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk back from SDPA's K (or V) through the repeat; return (un-repeated source, repeat nodes)."""
    chain = []
    n = kv
    while isinstance(n, fx.Node) and _is_head_repeat(n) and flow.out_degree(n) == 1:
        chain.append(n)
        n = n.args[0]
    return n, chain


# ---------------------------------------------------------------- cache updates (the pattern table)

@dataclass
class CacheUpdate:
    kind: str                     # "growing" | "static"
    past: fx.Node                 # past K/V (growing) or the buffer (static)
    new: fx.Node                  # this step's K/V, [B, Hkv, T, D]
    positions: fx.Node | None     # [T] absolute positions (static)
    node: fx.Node                 # the update node itself
    outputs: tuple[fx.Node, ...]  # nodes whose value is the updated cache (besides the repeat chain)


def _growing_cat(flow: nx.DiGraph, src: fx.Node, sdpa: fx.Node) -> CacheUpdate | None:
    """DynamicCache: keys = torch.cat([past, new], dim=-2)."""
    if not (src.op == "call_function" and src.target is torch.cat):
        return None
    tensors = src.args[0]
    dim = src.kwargs.get("dim", src.args[1] if len(src.args) > 1 else 0)
    if not (isinstance(tensors, (list, tuple)) and len(tensors) == 2 and dim in (2, -2)):
        return None
    return CacheUpdate("growing", tensors[0], tensors[1], None, src, ())


def _mutations_before(flow: nx.DiGraph, buf: fx.Node, sdpa: fx.Node) -> list[fx.Node]:
    order = flow.nodes[sdpa]["order"]
    return [n for n in flow.successors(buf)
            if flow.nodes[n]["order"] < order and n.args and n.args[0] is buf
            and ((n.op == "call_method" and n.target in ("index_copy_", "index_put_"))
                 or (n.op == "call_function" and n.target is operator.setitem))]


_BUFFER_FACTORIES = {torch.zeros, torch.empty, torch.full, torch.zeros_like, torch.empty_like}


def _static_buffer(flow: nx.DiGraph, src: fx.Node, sdpa: fx.Node) -> CacheUpdate | None:
    """StaticCache: buf.index_copy_(2, pos, new); gpt-fast: buf[:, :, pos] = new.  The buffer is a graph
    input, a module buffer, or (StaticCache's lazy first call) allocated in the graph; attention may read
    a prefix of it (buf[:, :, :n])."""
    buf = src
    if buf.op == "call_method" and buf.target == "index_copy_":
        buf = buf.args[0]
    elif buf.op == "call_function" and buf.target is operator.getitem and isinstance(buf.args[1], tuple):
        idx = buf.args[1]
        if (len(idx) >= 3 and idx[0] == slice(None) and idx[1] == slice(None) and isinstance(idx[2], slice)
                and idx[2].start in (None, 0) and idx[2].step in (None, 1)
                and all(i == slice(None) for i in idx[3:])):
            buf = buf.args[0]
    if not (buf.op in ("placeholder", "get_attr")
            or buf.op == "call_function" and buf.target in _BUFFER_FACTORIES):
        return None
    muts = _mutations_before(flow, buf, sdpa)
    if len(muts) != 1:
        return None
    m = muts[0]
    if m.target == "index_copy_" and m.args[1] in (2, -2) and isinstance(m.args[2], fx.Node):
        return CacheUpdate("static", buf, m.args[3], m.args[2], m, ())
    if m.target is operator.setitem:
        idx = m.args[1]
        if (isinstance(idx, tuple) and len(idx) == 3 and idx[0] == slice(None) and idx[1] == slice(None)
                and isinstance(idx[2], fx.Node) and isinstance(m.args[2], fx.Node)):
            return CacheUpdate("static", buf, m.args[2], idx[2], m, ())
    return None


CACHE_UPDATES: tuple[Callable[[nx.DiGraph, fx.Node, fx.Node], CacheUpdate | None], ...] = (
    _growing_cat,
    _static_buffer,
)


# ---------------------------------------------------------------- one site

@dataclass
class Site:
    index: int
    sdpa: fx.Node
    report: SiteReport
    q: fx.Node | None = None
    k: CacheUpdate | None = None
    v: CacheUpdate | None = None
    chains: tuple[list[fx.Node], list[fx.Node]] = ([], [])
    mask: fx.Node | None = None
    scale: float = 1.0
    placeholder_past: bool = False  # the model's cache already holds kvpass placeholders
    offload: bool = False           # append this step's KV to the store (also for some dense sites)


def site_name(node: fx.Node, index: int) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return f"attention[{index}]"
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']*'\](\[\d+\])?\.?", "", path)            # L['args'][0].model... / L['self']...
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path).lstrip(".")
    return path or f"attention[{index}]"


def _layer_of(name: str) -> int | None:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def _sdpa_args(node: fx.Node) -> dict:
    a = dict(zip(SDPA_ARGS, node.args))
    a.update(node.kwargs)
    return a


def analyse(gm: fx.GraphModule, opts: Options) -> list[Site]:
    flow = dataflow(gm.graph)
    sites = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in SDPA_TARGETS:
            name = site_name(n, len(sites))
            rep = SiteReport(name=name, layer=_layer_of(name), phase="-", rewritten=False, reason="", cache="none")
            site = Site(len(sites), n, rep)
            _decide(flow, site, opts)
            sites.append(site)
    return sites


def _dense(site: Site, reason: str) -> None:
    site.report.rewritten, site.report.reason = False, reason


def _decide(flow: nx.DiGraph, site: Site, opts: Options) -> None:
    a = _sdpa_args(site.sdpa)
    q, k, v = a["query"], a["key"], a["value"]
    rep = site.report
    if rep.layer is not None and rep.layer in opts.dense_layers:
        return _dense(site, "listed in dense_layers")
    qv = _val(q)
    if qv is None or qv.dim() != 4:
        return _dense(site, "query is not a [B, H, T, D] tensor")
    if qv.dtype not in SUPPORTED_DTYPES:
        return _dense(site, f"dtype {qv.dtype} is not supported (float32, bfloat16, float16)")
    dropout = a.get("dropout_p", 0.0)
    if not (isinstance(dropout, (int, float)) and dropout == 0.0):
        return _dense(site, "dropout_p != 0 (training)")
    scale = a.get("scale")
    head_dim = _static_int(qv.shape[-1])
    if isinstance(scale, fx.Node) or head_dim is None:
        return _dense(site, "scale or head_dim is not a compile-time constant")
    site.scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)

    (k_src, k_chain), (v_src, v_chain) = strip_repeat(flow, k), strip_repeat(flow, v)
    upd_k = next((u for f in CACHE_UPDATES if (u := f(flow, k_src, site.sdpa))), None)
    upd_v = next((u for f in CACHE_UPDATES if (u := f(flow, v_src, site.sdpa))), None)
    if upd_k is None or upd_v is None:
        return _dense(site, "no KV-cache update feeds this attention (prefill-only or cache-less module)")
    if upd_k.kind != upd_v.kind or (upd_k.positions is not upd_v.positions and upd_k.kind == "static"):
        return _dense(site, "K and V are updated differently")
    kv_val = _val(upd_k.new)
    if kv_val is None or kv_val.dim() != 4 or qv.shape[1] % kv_val.shape[1] != 0:
        return _dense(site, "cache update is not [B, Hkv, T, D] with H % Hkv == 0")
    if not (k_chain or a.get("enable_gqa", False)) and kv_val.shape[1] != qv.shape[1]:
        return _dense(site, "K has fewer heads than Q but no GQA repeat or enable_gqa was found")
    site.q, site.k, site.v, site.chains = q, upd_k, upd_v, (k_chain, v_chain)
    site.mask = a.get("attn_mask")
    rep.cache = upd_k.kind
    is_causal = bool(a.get("is_causal", False))
    q_len = _static_int(qv.shape[-2])

    if upd_k.kind == "growing":
        past = _val(upd_k.past)
        past_len = _expr(past.shape[-2]) if past is not None and past.dim() == 4 else sympy.Integer(0)
        site.placeholder_past = past is not None and past.dim() == 4 and past.stride(2) == 0 and past_len != 1
        others = [u for u in flow.successors(upd_k.node) if u not in k_chain and u is not site.sdpa] + \
                 [u for u in flow.successors(upd_v.node) if u not in v_chain and u is not site.sdpa]
        if any(u.op != "output" for u in others):
            return _must_stay_dense(site, "the concatenated cache is read by something besides attention")
        if past_len == 0:  # sympy: the past length is the constant 0 → a prefill
            rep.phase = "prefill"
            site.offload = rep.rewritten = True  # the model's own SDPA (and mask) runs on the real KV
            rep.reason = "prefill: dense SDPA; prompt KV offloaded"
            return None
        rep.phase = "decode"
        if is_causal:
            return _must_stay_dense(site, "is_causal over a cache aligns the diagonal top-left; "
                                          "kvpass will not guess the intended mask")
        if site.mask is None and q_len != 1:
            return _must_stay_dense(site, "a multi-token block with no mask attends non-causally")
        if q_len is not None and q_len > opts.window_size:
            return _must_stay_dense(site, f"query block of {q_len} > window_size={opts.window_size}")
        site.offload = rep.rewritten = True
        rep.reason = "split: sinks+window on device, rest on host" + (" (model's mask applied at run time)"
                                                                     if site.mask is not None else "")
        return None

    # static buffer: the model keeps owning it, so dense attention stays possible; the store is filled
    # at every step either way, so that a later split step finds every token
    site.offload = rep.rewritten = True
    if q_len != 1:
        rep.phase, rep.reason = "prefill", "prefill: dense SDPA over the model's buffer; KV offloaded"
        return None
    rep.phase = "decode"
    if site.mask is None or is_causal:
        rep.phase, rep.rewritten = "dense", False
        rep.reason = "no explicit mask over a preallocated cache: kept dense (KV still offloaded)"
        return None
    rep.reason = "split: sinks+window on device, rest on host (model's mask applied at run time)"
    return None


def _must_stay_dense(site: Site, reason: str) -> None:
    if site.placeholder_past:  # the real KV is in kvpass's store, not in the model's cache
        raise UnsupportedSite(
            f"kvpass: attention site {site.index} ({site.report.name}): {reason}, but its KV lives in kvpass's "
            f"store, so dense attention is impossible. Keep the layer dense from the start with "
            f"options={{'dense_layers': [...]}}, or call kvpass.reset() and use a fresh cache.")
    _dense(site, reason)


# ---------------------------------------------------------------- rewrite

def rewrite(gm: fx.GraphModule, sites: list[Site], opts: Options) -> None:
    g = gm.graph
    cfg = opts.key()
    threads = opts.cpu_threads or 0
    for site in sites:
        if not site.offload:
            continue
        k, v, name = site.k, site.v, site.report.name
        with g.inserting_before(site.sdpa):
            if k.kind == "growing":
                handle = g.call_function(ops.append_growing, (k.past, v.past, k.new, v.new, name, cfg))
                for upd in (k, v):
                    ph = g.call_function(ops.placeholder, (handle, upd.past, upd.new))
                    chain = site.chains[0] if upd is k else site.chains[1]
                    upd.node.replace_all_uses_with(ph, delete_user_cb=lambda u, c=chain, s=site.sdpa: u not in c
                                                   and u is not s)
            else:
                handle = g.call_function(ops.append_static, (k.past, v.past, k.new, v.new, k.positions, name, cfg))
            if site.report.phase == "decode":
                out = g.call_function(ops.split_attention,
                                      (site.q, handle, site.mask, site.scale, opts.estimator, threads, name))
        if site.report.phase == "decode":
            site.sdpa.replace_all_uses_with(out)
            dead = [site.sdpa, *site.chains[0], *site.chains[1]]
            if k.kind == "growing":
                dead += [k.node, v.node]
            for n in dead:  # in program order: each is dead once its consumers are gone
                if not n.users:
                    g.erase_node(n)
    g.lint()
    gm.recompile()


def run_pass(gm: fx.GraphModule, opts: Options, needs_grad: bool = False) -> Report:
    sites = analyse(gm, opts)
    if needs_grad:  # kvpass's ops have no backward; training graphs stay exactly as they are
        for s in sites:
            if s.placeholder_past:
                raise UnsupportedSite(f"kvpass: attention site {s.index} ({s.report.name}) needs gradients, "
                                      f"but its KV lives in kvpass's store; decode under torch.no_grad().")
            s.offload = False
            _dense(s, "autograd is on (call under torch.no_grad() / inference_mode to decode with kvpass)")
    report = Report(graphs=1, sites=[s.report for s in sites])
    if opts.on_unmatched == "error":
        bad = [s for s in sites if not s.report.rewritten and s.report.reason != "listed in dense_layers"]
        if bad:
            s = bad[0]
            raise UnsupportedSite(f"kvpass: attention site {s.index} ({s.report.name}) cannot be rewritten: "
                                  f"{s.report.reason}. (on_unmatched='error'; pass on_unmatched='fallback' "
                                  f"to keep it dense.)")
    if not opts.dryrun:
        rewrite(gm, sites, opts)
    return report
