"""The one attention-site matcher, for the compile pass (Dynamo graphs) and the ONNX export (``torch.export``
ATen graphs) alike.

A site is a scaled-dot-product attention whose K/V come — through a GQA repeat, normalised away first —
from a KV-cache update.  Matching is data: the ops each graph level spells a thing with (``SDPA``,
``REPEAT``), a table of cache-update recognisers (``CACHE_UPDATES``), and tables of guards — small
predicates that return the reason a site must stay dense, or None.  Prefill vs decode is read from the
symbolic shapes (sympy).  The dataflow is a networkx view of the FX graph.  ``site_name`` is the one way
a site is named; the name also seeds the site's LSH projection, so both users must agree on it.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx
import sympy
import torch
from torch import fx

from kvpass.lowering.attention import softcapped_attention
from kvpass.report import SiteReport
from kvpass.runtime import Options

aten = torch.ops.aten
SDPA = {torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
        aten.scaled_dot_product_attention.default, softcapped_attention}
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SUPPORTED_DTYPES = {torch.float32, torch.bfloat16, torch.float16}
CAT = {torch.cat, aten.cat.default}
# ops of a kv-head repeat that keep the head -> kv-head map (h -> h // G) whatever their arguments
REPEAT = {"expand", "reshape", "view", "contiguous", aten.expand.default, aten.reshape.default, aten.view.default,
          aten._unsafe_view.default, aten.clone.default}
UNSQUEEZE = {"unsqueeze", torch.unsqueeze, aten.unsqueeze.default}             # a new axis after the heads
REPEAT_INTERLEAVE = {"repeat_interleave", torch.repeat_interleave, aten.repeat_interleave.self_int}  # dim=1


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
    """A node's example value: Dynamo's "example_value" or torch.export's "val"."""
    if not isinstance(n, fx.Node):
        return None
    v = n.meta.get("example_value", n.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def _expr(x) -> sympy.Expr:
    """A size as a sympy expression (SymInt → its symbolic expression)."""
    return x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))


def _static_int(x) -> int | None:
    e = _expr(x)
    return int(e) if e.is_number else None


def _op(n: fx.Node):
    """What a node calls: a method name, or the function / ATen overload."""
    return n.target if n.op in ("call_method", "call_function") else None


def _arg(n: fx.Node, i: int, name: str):
    return n.kwargs.get(name, n.args[i] if len(n.args) > i else None)


# ---------------------------------------------------------------- the GQA repeat, normalised first

def _is_head_repeat(n: fx.Node) -> bool:
    """One step of a repeat of kv heads that maps query head h to kv head h // G."""
    op = _op(n)
    if op in REPEAT:
        return True
    if op in REPEAT_INTERLEAVE:
        return _arg(n, 2, "dim") == 1
    if op in UNSQUEEZE:
        return _arg(n, 1, "dim") == 2
    if op is operator.getitem and isinstance(n.args[1], tuple):
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


# ---------------------------------------------------------------- cache updates (the recogniser table)

@dataclass
class CacheUpdate:
    kind: str                     # "growing" | "static"
    past: fx.Node                 # past K/V (growing) or the buffer (static)
    new: fx.Node                  # this step's K/V, [B, Hkv, T, D]
    positions: fx.Node | None     # [T] absolute positions (static)
    node: fx.Node                 # the update node itself


def _growing_cat(flow: nx.DiGraph, src: fx.Node, sdpa: fx.Node) -> CacheUpdate | None:
    """DynamicCache: keys = torch.cat([past, new], dim=-2)."""
    if _op(src) not in CAT:
        return None
    tensors, dim = src.args[0], _arg(src, 1, "dim") or 0
    if not (isinstance(tensors, (list, tuple)) and len(tensors) == 2 and dim in (2, -2)):
        return None
    return CacheUpdate("growing", tensors[0], tensors[1], None, src)


def _mutations_before(flow: nx.DiGraph, buf: fx.Node, sdpa: fx.Node) -> list[fx.Node]:
    order = flow.nodes[sdpa]["order"]
    return [n for n in flow.successors(buf)
            if flow.nodes[n]["order"] < order and n.args and n.args[0] is buf
            and (_op(n) in ("index_copy_", "index_put_") or _op(n) is operator.setitem)]


_BUFFER_FACTORIES = {torch.zeros, torch.empty, torch.full, torch.zeros_like, torch.empty_like}


def _static_buffer(flow: nx.DiGraph, src: fx.Node, sdpa: fx.Node) -> CacheUpdate | None:
    """StaticCache: buf.index_copy_(2, pos, new); gpt-fast: buf[:, :, pos] = new.  The buffer is a graph
    input, a module buffer, or (StaticCache's lazy first call) allocated in the graph; attention may read
    a prefix of it (buf[:, :, :n])."""
    buf = src
    if _op(buf) == "index_copy_":
        buf = buf.args[0]
    elif _op(buf) is operator.getitem and isinstance(buf.args[1], tuple):
        idx = buf.args[1]
        if (len(idx) >= 3 and idx[0] == slice(None) and idx[1] == slice(None) and isinstance(idx[2], slice)
                and idx[2].start in (None, 0) and idx[2].step in (None, 1)
                and all(i == slice(None) for i in idx[3:])):
            buf = buf.args[0]
    if not (buf.op in ("placeholder", "get_attr") or _op(buf) in _BUFFER_FACTORIES):
        return None
    muts = _mutations_before(flow, buf, sdpa)
    if len(muts) != 1:
        return None
    m = muts[0]
    if m.target == "index_copy_" and m.args[1] in (2, -2) and isinstance(m.args[2], fx.Node):
        return CacheUpdate("static", buf, m.args[3], m.args[2], m)
    if m.target is operator.setitem:
        idx = m.args[1]
        if (isinstance(idx, tuple) and len(idx) == 3 and idx[0] == slice(None) and idx[1] == slice(None)
                and isinstance(idx[2], fx.Node) and isinstance(m.args[2], fx.Node)):
            return CacheUpdate("static", buf, m.args[2], idx[2], m)
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
    args: dict = field(default_factory=dict)  # SDPA's arguments by name
    flow: nx.DiGraph | None = None
    q: fx.Node | None = None
    k: CacheUpdate | None = None
    v: CacheUpdate | None = None
    chains: tuple[list[fx.Node], list[fx.Node]] = ([], [])
    mask: fx.Node | None = None
    scale: float = 1.0
    softcap: float = 0.0            # > 0: the scores are soft-capped (softcapped_attention)
    placeholder_past: bool = False  # the model's cache already holds kvpass placeholders
    offload: bool = False           # append this step's KV to the store (also for some dense sites)

    @property
    def q_val(self) -> torch.Tensor | None:
        return _val(self.q)

    @property
    def q_len(self) -> int | None:
        return _static_int(self.q_val.shape[-2])


def site_name(node: fx.Node, index: int, root: str = "") -> str:
    """The module path of an attention, e.g. "model.layers.7.self_attn", from either graph level's
    nn_module_stack (Dynamo: ``L['self'].model.layers[7].self_attn``; export: ``model.layers.7.self_attn``),
    relative to ``root`` (the export wraps the model as ``root``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return f"attention[{index}]"
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']*'\](\[\d+\])?\.?", "", path)            # L['args'][0].model... / L['self']...
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path).lstrip(".")
    if root and path.startswith(root + "."):
        path = path[len(root) + 1:]
    return path or f"attention[{index}]"


def layer_of(name: str) -> int | None:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------- guards: a reason to stay dense, or None

Guard = Callable[[Site, Options], "str | None"]


def _listed_dense(site: Site, opts: Options) -> str | None:
    layer = site.report.layer
    return "listed in dense_layers" if layer is not None and layer in opts.dense_layers else None


def _query_shape(site: Site, opts: Options) -> str | None:
    qv = site.q_val
    return None if qv is not None and qv.dim() == 4 else "query is not a [B, H, T, D] tensor"


def _dtype(site: Site, opts: Options) -> str | None:
    dtype = site.q_val.dtype
    return None if dtype in SUPPORTED_DTYPES else f"dtype {dtype} is not supported (float32, bfloat16, float16)"


def _no_dropout(site: Site, opts: Options) -> str | None:
    p = site.args.get("dropout_p", 0.0)
    return None if isinstance(p, (int, float)) and p == 0.0 else "dropout_p != 0 (training)"


def _constant_scale(site: Site, opts: Options) -> str | None:
    if isinstance(site.args.get("scale"), fx.Node) or _static_int(site.q_val.shape[-1]) is None:
        return "scale or head_dim is not a compile-time constant"
    return None


SITE_GUARDS: tuple[Guard, ...] = (_listed_dense, _query_shape, _dtype, _no_dropout, _constant_scale)


def _cache_found(site: Site, opts: Options) -> str | None:
    if site.k is None or site.v is None:
        return "no KV-cache update feeds this attention (prefill-only or cache-less module)"
    return None


def _same_update(site: Site, opts: Options) -> str | None:
    k, v = site.k, site.v
    if k.kind != v.kind or (k.kind == "static" and k.positions is not v.positions):
        return "K and V are updated differently"
    return None


def _kv_shape(site: Site, opts: Options) -> str | None:
    kv, qv = _val(site.k.new), site.q_val
    if kv is None or kv.dim() != 4 or qv.shape[1] % kv.shape[1] != 0:
        return "cache update is not [B, Hkv, T, D] with H % Hkv == 0"
    if not (site.chains[0] or site.args.get("enable_gqa", False)) and kv.shape[1] != qv.shape[1]:
        return "K has fewer heads than Q but no GQA repeat or enable_gqa was found"
    return None


CACHE_GUARDS: tuple[Guard, ...] = (_cache_found, _same_update, _kv_shape)


def _keeps_last(node: fx.Node) -> int | None:
    """N when ``node`` takes the last N tokens of a [B, H, T, D] cache (x[:, :, -N:], or aten.slice on dim
    2 from -N), else None."""
    if node.target is operator.getitem and len(node.args) == 2 and isinstance(node.args[1], tuple):
        idx = node.args[1]
        if len(idx) >= 3 and all(i == slice(None) for i in idx[:2]) and isinstance(idx[2], slice):
            start = idx[2].start
            if isinstance(start, int) and start < 0 and idx[2].stop is None and idx[2].step in (None, 1):
                return -start
    if node.target is torch.ops.aten.slice.Tensor and len(node.args) >= 3 and node.args[1] in (2, -2):
        start = node.args[2]
        if isinstance(start, int) and start < 0:
            return -start
    return None


def _cache_read_elsewhere(site: Site, opts: Options) -> str | None:
    flow, k, v = site.flow, site.k, site.v
    others = [u for u in flow.successors(k.node) if u not in site.chains[0] and u is not site.sdpa] + \
             [u for u in flow.successors(v.node) if u not in site.chains[1] and u is not site.sdpa]
    others = [u for u in others if u.op != "output"]
    kept = {_keeps_last(u) for u in others}
    if others and None not in kept:
        return (f"a sliding-window layer: the model keeps the last {max(kept)} tokens of its cache; left dense, "
                f"its own bounded cache (exact, and never offloaded)")
    return "the concatenated cache is read by something besides attention" if others else None


def _not_causal_over_cache(site: Site, opts: Options) -> str | None:
    if site.report.phase == "decode" and bool(site.args.get("is_causal", False)):
        return "is_causal over a cache aligns the diagonal top-left; kvpass will not guess the intended mask"
    return None


def _masked_block(site: Site, opts: Options) -> str | None:
    if site.report.phase == "decode" and site.mask is None and site.q_len != 1:
        return "a multi-token block with no mask attends non-causally"
    return None


# a growing cache's step; failing one of these when the real KV already lives in kvpass's store raises.
# (A block of any length is split: one longer than the window — a prefill chunk, a long draft — reaches
# the host store, and the op attends it exactly and causally: ops._block_reaches_host.)
GROWING_GUARDS: tuple[Guard, ...] = (_cache_read_elsewhere, _not_causal_over_cache, _masked_block)


def _first(guards: tuple[Guard, ...], site: Site, opts: Options) -> str | None:
    return next((r for g in guards if (r := g(site, opts)) is not None), None)


# ---------------------------------------------------------------- analysis

# ---------------------------------------------------------------- decomposed (eager) attention

MATMUL = {torch.matmul, operator.matmul, "matmul"}
SOFTMAX = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax, "softmax"}
TRANSPOSE = {torch.transpose, "transpose"}
DROPOUT = {torch.nn.functional.dropout, torch.dropout, "dropout"}


def _only_user(n: fx.Node, user: fx.Node) -> bool:
    return list(n.users) == [user]


def _last_two_swapped(n: fx.Node) -> bool:
    """n = x.transpose(-2, -1) of a 4-D x (the attention's K^T)."""
    if _op(n) not in TRANSPOSE:
        return False
    x = _val(n.args[0])
    nd = x.dim() if x is not None else 4
    dims = {d % nd for d in n.args[1:3] if isinstance(d, int)}
    return dims == {nd - 2, nd - 1}


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def fuse_decomposed_attention(gm: fx.GraphModule, root: str = "") -> list[str]:
    """Replace each ``softmax(q @ k^T · s (+ mask | masked_fill(c, -inf)), -1) [.to(dtype)] [dropout(p=0)] @ v``
    of a Dynamo graph (eager attention: Hugging Face's ``attn_implementation="eager"``, nanoGPT-style
    modules) by the equal ``F.scaled_dot_product_attention(q, k, v, attn_mask, scale=s)``, so that the
    matcher sees it as any other site (the way Inductor's fuse_attention patterns do).  A logit soft-cap
    between the scale and the mask, ``tanh(s / c) · c`` (Gemma 2), makes it ``softcapped_attention(...,
    softcap=c)`` instead.  Returns, per softmax over q·k^T it leaves alone, why."""
    g, left = gm.graph, []
    muls, divs = (operator.mul, torch.mul, "mul"), (operator.truediv, torch.div, "div")

    def const_and_input(n):
        """(c, x) of n = x · c, c · x or x / c (as 1 / c) with a number c; else None."""
        c = next((_number(a) for a in n.args if _number(a) is not None), None)
        x = next((a for a in n.args if isinstance(a, fx.Node)), None)
        if c is None or x is None or len(n.args) != 2 or (_op(n) in divs and n.args[0] is not x):
            return None
        return (c if _op(n) in muls else (1.0 / c if c else None)), x
    for sm in list(g.nodes):
        if _op(sm) not in SOFTMAX:
            continue
        dim, x = _arg(sm, 1, "dim"), _val(sm)
        if not isinstance(dim, int) or x is None or dim % x.dim() != x.dim() - 1:
            continue
        # forward: [.to / .float / .type_as] [dropout(p=0)] then @ v
        after = []
        while len((cur := after[-1] if after else sm).users) == 1:
            nxt = next(iter(cur.users))
            if _op(nxt) in ("to", "type_as", "float") or (_op(nxt) in DROPOUT and (
                    _number(_arg(nxt, 1, "p")) == 0.0 or _arg(nxt, 2, "training") is False)):
                after.append(nxt)
            else:
                break
        cur = after[-1] if after else sm
        out = next(iter(cur.users)) if len(cur.users) == 1 else None
        if out is None or _op(out) not in MATMUL or out.args[0] is not cur:
            continue
        # backward: [+ mask | masked_fill(cond, -inf)] [· s | / s] q @ k^T — each step used only by the next
        node, mask, scale, user = sm.args[0], None, None, sm
        if isinstance(node, fx.Node) and _only_user(node, user):
            if _op(node) in (operator.add, torch.add, "add") and isinstance(node.args[1], fx.Node):
                mask, user, node = node.args[1], node, node.args[0]
            elif _op(node) in (torch.masked_fill, "masked_fill") and _number(_arg(node, 2, "value")) == float("-inf"):
                mask, user, node = ("not", node.args[1]), node, node.args[0]
        softcap = None
        if isinstance(node, fx.Node) and _only_user(node, user) and _op(node) in muls + divs and (
                (cx := const_and_input(node)) is not None and _op(cx[1]) in (torch.tanh, "tanh")):
            # c · tanh(x / c): the soft-cap, then the scale step below on x
            c, th = cx
            inner = th.args[0]
            ix = const_and_input(inner) if isinstance(inner, fx.Node) and _op(inner) in muls + divs else None
            if not (c and c > 0 and _only_user(th, node) and _only_user(inner, th) and ix is not None
                    and math.isclose(ix[0] * c, 1.0, rel_tol=1e-6)):
                left.append(f"{site_name(sm, len(left), root)}: a tanh before the softmax that is not a logit "
                            f"soft-cap c·tanh(s / c); left dense")
                continue
            softcap, user, node = c, inner, ix[1]
        if (isinstance(node, fx.Node) and _only_user(node, user) and _op(node) in muls + divs
                and (cx := const_and_input(node)) is not None and cx[0]):
            scale, user, node = cx[0], node, cx[1]
        if not (isinstance(node, fx.Node) and _op(node) in MATMUL and _only_user(node, user)):
            continue
        q, kt = node.args[0], node.args[1]
        if not (isinstance(kt, fx.Node) and _last_two_swapped(kt)) or scale is None:
            continue
        with g.inserting_before(out):
            if isinstance(mask, tuple):  # masked_fill(c, -inf): attend where c is False
                cond = mask[1]
                mask = g.call_function(torch.logical_not, (cond,))
                if (cv := _val(cond)) is not None:
                    mask.meta["example_value"] = torch.logical_not(cv)
            kw = {"attn_mask": mask, "dropout_p": 0.0, "scale": scale}
            if softcap is None:
                sdpa = g.call_function(torch.nn.functional.scaled_dot_product_attention, (q, kt.args[0], out.args[1]), kw)
            else:
                sdpa = g.call_function(softcapped_attention, (q, kt.args[0], out.args[1]), {**kw, "softcap": softcap})
        sdpa.meta.update(out.meta)
        out.replace_all_uses_with(sdpa)
        first = sm.args[0]
        for n in (out, *reversed(after), sm):
            g.erase_node(n)
        _erase_unused(g, first)
    g.lint()
    gm.recompile()
    return left


def _erase_unused(g: fx.Graph, n) -> None:
    """Erase ``n`` and then its producers while they are unused pure calls (the fused scores' chain)."""
    todo = [n]
    while todo:
        n = todo.pop()
        if (isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and not n.users
                and not str(getattr(n.target, "__name__", n.target)).endswith("_")):
            ins = n.all_input_nodes
            g.erase_node(n)
            todo.extend(ins)


def analyse(gm: fx.GraphModule, opts: Options, root: str = "") -> list[Site]:
    """Every SDPA node of ``gm`` as a Site, matched and decided (``site.report`` says what and why)."""
    flow = dataflow(gm.graph)
    sites = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in SDPA:
            name = site_name(n, len(sites), root)
            rep = SiteReport(name=name, layer=layer_of(name), phase="-", rewritten=False, reason="", cache="none")
            site = Site(len(sites), n, rep, args={**dict(zip(SDPA_ARGS, n.args)), **n.kwargs}, flow=flow)
            _decide(site, opts)
            sites.append(site)
    return sites


def _dense(site: Site, reason: str) -> None:
    site.report.rewritten, site.report.reason = False, reason


def _decide(site: Site, opts: Options) -> None:
    a, rep, flow = site.args, site.report, site.flow
    site.q = a["query"]
    if (reason := _first(SITE_GUARDS, site, opts)) is not None:
        return _dense(site, reason)
    scale = a.get("scale")
    site.scale = float(scale) if scale is not None else 1.0 / math.sqrt(_static_int(site.q_val.shape[-1]))
    site.softcap = float(a.get("softcap") or 0.0)
    (k_src, k_chain), (v_src, v_chain) = strip_repeat(flow, a["key"]), strip_repeat(flow, a["value"])
    site.chains = (k_chain, v_chain)
    site.k = next((u for f in CACHE_UPDATES if (u := f(flow, k_src, site.sdpa))), None)
    site.v = next((u for f in CACHE_UPDATES if (u := f(flow, v_src, site.sdpa))), None)
    if (reason := _first(CACHE_GUARDS, site, opts)) is not None:
        return _dense(site, reason)
    site.mask = a.get("attn_mask")
    rep.cache = site.k.kind

    if site.k.kind == "growing":
        past = _val(site.k.past)
        past_len = _expr(past.shape[-2]) if past is not None and past.dim() == 4 else sympy.Integer(0)
        site.placeholder_past = past is not None and past.dim() == 4 and past.stride(2) == 0 and past_len != 1
        rep.phase = "prefill" if past_len == 0 else "decode"  # sympy: a constant 0 past is a prefill
        if (reason := _first(GROWING_GUARDS, site, opts)) is not None:
            if site.placeholder_past:  # the real KV is in kvpass's store, not in the model's cache
                raise UnsupportedSite(
                    f"kvpass: attention site {site.index} ({rep.name}): {reason}, but its KV lives in kvpass's "
                    f"store, so dense attention is impossible. Keep the layer dense from the start with "
                    f"options={{'dense_layers': [...]}}, or call kvpass.reset() and use a fresh cache.")
            return _dense(site, reason)
        site.offload = rep.rewritten = True
        if rep.phase == "prefill":  # the model's own SDPA (and mask) runs on the real KV
            rep.reason = "prefill: dense SDPA; prompt KV offloaded"
        else:
            rep.reason = "split: sinks+window on device, rest on host" + (
                " (model's mask applied at run time)" if site.mask is not None else "")
        return None

    # static buffer: the model keeps owning it, so dense attention stays possible; the store is filled
    # at every step either way, so that a later split step finds every token
    site.offload = rep.rewritten = True
    if site.q_len != 1:
        rep.phase, rep.reason = "prefill", "prefill: dense SDPA over the model's buffer; KV offloaded"
        return None
    rep.phase = "decode"
    if site.mask is None or a.get("is_causal", False):
        rep.phase, rep.rewritten = "dense", False
        rep.reason = "no explicit mask over a preallocated cache: kept dense (KV still offloaded)"
        return None
    rep.reason = "split: sinks+window on device, rest on host (model's mask applied at run time)"
    return None
