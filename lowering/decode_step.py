"""The decode step of one attention site with its state explicit: the form kvpass exports (ONNX).

The compiled path keeps each site's KV in a ``KVStore`` (runtime state behind a handle).  An exported
graph cannot reach Python objects, so there the state travels as tensors, in the store's own layout
(``kvpass.runtime.store.KVStore``; B batch, Hkv kv heads, D head_dim, S sinks, W window, N host tokens,
L tables of K bits):

    static_k, static_v  [B, Hkv, S+W, D]   sink slots, then the window ring: position p ≥ S sits in
                                           slot S + (p − S) mod W
    host_k, host_v      [B, Hkv, N, D]     host token i is position S + i
    codes               [B, Hkv, N, L]     int32 SimHash codes of host_k − mu
    mu                  [B, Hkv, D]        fp32 key centre (built once, then frozen: see below)
    proj                [Hkv, D, K·L]      fp32 (bf16 values) projection of the site  — a constant
    logp                [16385]            fp32 log P(retrieved | cos θ) on a cos θ grid — a constant
                                           (``reference.logp_table``)

One step at ``position`` p (the new token's absolute position), any p ≥ 0: the token leaving the window
(p − W, once the ring is full) moves to the host store (and its code to ``codes``), the new token takes
its slot (sink p for p < S, else the ring's), then attention = static part (exact, the filled slots) ⊕
host part, merged through the log-sum-exp.  The host part is what ``KVStore.attend`` does: while fewer
than ``min_keys`` tokens are offloaded there is no index and every host key is read exactly; the step
that offloads the min_keys-th token builds the index as ``LSHIndex.add`` does (μ = the mean of those
keys, every code recomputed) and from then on the estimator runs.  Exactly what ``KVStore.append`` +
``KVStore.attend`` compute; the host part's retrieval is the dense-cost equivalent of the C++ kernel's
bucket lookups (same codes, same threshold, same log P table and interpolation), so the result is the same.

A short context (p < S + W: nothing offloaded yet) still appends one host row per step — the empty slot's
content, a placeholder — so that the host tensors always grow by one; host row i is a real token only
among the last max(0, p − S − W + 1) rows.  A sequence that starts long has no placeholder rows.

``kvpass::decode_step`` is a custom op whose implementation is ``decode_step_reference`` (plain torch):
an exported graph shows it as one node; the portable ONNX translation decomposes it into standard ops.
"""

from __future__ import annotations

import torch
from kvpass.lowering.attention import merge_partials, softmax_lse
from kvpass.lowering.reference import MIN_KEYS, estimator_scores, hash_codes, ring_slot

EXPORT_ESTIMATORS = ("exact", "sample", "none")


def decode_step_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, static_k: torch.Tensor,
                          static_v: torch.Tensor, host_k: torch.Tensor, host_v: torch.Tensor, codes: torch.Tensor,
                          mu: torch.Tensor, proj: torch.Tensor, logp: torch.Tensor, position: torch.Tensor,
                          sink_size: int, window_size: int, lsh_k: int, threshold: int, estimator: str,
                          scale: float, min_keys: int = MIN_KEYS) -> tuple[torch.Tensor, ...]:
    """One decode step (see the module docstring).  q [B, H, 1, D]; k_new, v_new [B, Hkv, 1, D].
    Returns (out [B, H, 1, D] in q's dtype, static_k, static_v, host_k, host_v, codes, mu) — the state
    after the step (host tensors one row longer)."""
    if estimator not in EXPORT_ESTIMATORS:
        raise ValueError(f"kvpass: estimator {estimator!r} cannot be exported; one of {EXPORT_ESTIMATORS}")
    B, H, _, D = q.shape
    Hkv = k_new.shape[1]
    S, W = sink_size, window_size
    slots = torch.arange(S + W, device=q.device)
    slot = torch.where(position < S, position, ring_slot(position, S, W)).reshape(1)
    leaving_k, leaving_v = static_k.index_select(2, slot), static_v.index_select(2, slot)
    here = (slots == slot)[:, None]  # [S+W, 1]
    new_sk = torch.where(here, k_new.to(static_k.dtype), static_k)
    new_sv = torch.where(here, v_new.to(static_v.dtype), static_v)
    new_hk = torch.cat([host_k, leaving_k.to(host_k.dtype)], 2)
    new_hv = torch.cat([host_v, leaving_v.to(host_v.dtype)], 2)
    n_host = new_hk.shape[2]
    real = (position - S - W + 1).clamp(min=0)  # host tokens after the step: the last `real` rows
    valid = torch.arange(n_host, device=q.device) >= n_host - real  # [N + 1]

    def build(hk, codes, leaving, mu, proj, real):  # the min_keys-th token: the index is built (LSHIndex.add)
        centre = hk[:, :, -min_keys:].float().mean(2)
        return centre, hash_codes(hk.float() - centre[:, :, None], proj, lsh_k)

    def append(hk, codes, leaving, mu, proj, real):  # no index yet: a zero code, as store_state has it
        code = hash_codes(leaving.float() - mu[:, :, None], proj, lsh_k)
        return mu.clone(), torch.cat([codes, torch.where(real > min_keys, code, torch.zeros_like(code))], 2)

    operands = (new_hk, codes, leaving_k, mu, proj, real)
    if type(real) is torch.Tensor:  # eager: a plain branch (torch.cond would compile itself at every call)
        new_mu, new_codes = (build if int(real) == min_keys else append)(*operands)
    else:  # traced (export): the graph carries both branches, onnx an If node
        new_mu, new_codes = torch.cond(real == min_keys, build, append, operands)

    qg = q.float().reshape(B, Hkv, H // Hkv, 1, D)
    s_static = (qg @ new_sk.float().transpose(-1, -2)[:, :, None]) * scale
    s_static = s_static.masked_fill(slots > position, float("-inf"))  # slots not filled yet (p < S + W)
    out, lse = softmax_lse(s_static, new_sv.float())
    if estimator != "none":
        hk = new_hk.float()
        qk = qg @ hk.transpose(-1, -2)[:, :, None]  # once, for both
        s, _ = estimator_scores(qg, hk, scale, "exact", qk=qk)
        if estimator == "sample":  # below min_keys there is no index: every key, exactly (KVStore.attend_host)
            q_codes = hash_codes(qg.reshape(B, Hkv, -1, D), proj, lsh_k).reshape(B, Hkv, H // Hkv, 1, -1)
            s_est, _ = estimator_scores(qg, hk, scale, estimator, q_codes=q_codes, k_codes=new_codes, mu=new_mu,
                                        logp=logp, threshold=threshold, qk=qk)
            s = torch.where(real < min_keys, s, s_est)
        out, _ = merge_partials(out, lse, *softmax_lse(s.masked_fill(~valid, float("-inf")), new_hv.float()))
    return (out.reshape(B, H, 1, D).to(q.dtype), new_sk, new_sv, new_hk, new_hv, new_codes, new_mu)


@torch.library.custom_op("kvpass::decode_step", mutates_args=())
def decode_step(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, static_k: torch.Tensor,
                static_v: torch.Tensor, host_k: torch.Tensor, host_v: torch.Tensor, codes: torch.Tensor,
                mu: torch.Tensor, proj: torch.Tensor, logp: torch.Tensor, position: torch.Tensor, sink_size: int,
                window_size: int, lsh_k: int, threshold: int, estimator: str, scale: float,
                min_keys: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor]:
    """``decode_step_reference`` as one graph node (outputs never alias inputs)."""
    return tuple(t.clone() if any(t is a for a in (static_k, static_v, host_k, host_v, codes, mu)) else t
                 for t in decode_step_reference(q, k_new, v_new, static_k, static_v, host_k, host_v, codes, mu,
                                                proj, logp, position, sink_size, window_size, lsh_k, threshold,
                                                estimator, scale, min_keys))


@decode_step.register_fake
def _(q, k_new, v_new, static_k, static_v, host_k, host_v, codes, mu, proj, logp, position, sink_size,
      window_size, lsh_k, threshold, estimator, scale, min_keys):
    B, Hkv, N, D = host_k.shape
    return (torch.empty_like(q), torch.empty_like(static_k), torch.empty_like(static_v),
            host_k.new_empty(B, Hkv, N + 1, D), host_v.new_empty(B, Hkv, N + 1, host_v.shape[3]),
            codes.new_empty(B, Hkv, N + 1, codes.shape[3]), torch.empty_like(mu))


# ---------------------------------------------------------------- the capacity layout (onnx_lsh="custom")
#
# The custom onnxruntime op updates the state in place when the caller binds each state output to its
# input's buffer, so there the host tensors do not grow: host_k/host_v/codes are [B, Hkv, CAP, ·]
# buffers whose first N = max(0, position − S − W) rows are the host tokens (the rest free capacity), and
# a step at position ≥ S + W writes row N (no placeholder rows: a shorter context writes none); the codes
# are int16 (lsh_k ≤ 15; half the bytes the op streams each step).  Same maths as above; only the layout
# differs.

def decode_step_capacity_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, static_k: torch.Tensor,
                                   static_v: torch.Tensor, host_k: torch.Tensor, host_v: torch.Tensor,
                                   codes: torch.Tensor, mu: torch.Tensor, proj: torch.Tensor, logp: torch.Tensor,
                                   position: torch.Tensor, sink_size: int, window_size: int, lsh_k: int,
                                   threshold: int, estimator: str, scale: float,
                                   min_keys: int = MIN_KEYS) -> tuple[torch.Tensor, ...]:
    """``decode_step_reference`` in the capacity layout: returns (out, static_k, static_v, host_k, host_v,
    codes, mu) with the host buffers the same size as given, row N = position − S − W written (none
    before the window is full; every code when this step builds the index)."""
    n = int(position) - sink_size - window_size
    cap = host_k.shape[2]
    if n >= cap:
        raise ValueError(f"kvpass: the step at position {int(position)} writes host row {n}; the host buffers "
                         f"hold {cap} rows (need row < capacity)")
    m = max(n, 0)
    out, sk, sv, hk, hv, c, new_mu = decode_step_reference(
        q, k_new, v_new, static_k, static_v, host_k[:, :, :m], host_v[:, :, :m], codes[:, :, :m].to(torch.int32), mu,
        proj, logp, position, sink_size, window_size, lsh_k, threshold, estimator, scale, min_keys)
    new_hk, new_hv, new_codes = host_k.clone(), host_v.clone(), codes.clone()
    if n >= 0:  # else the row the reference appended is the empty slot's placeholder
        new_hk[:, :, n], new_hv[:, :, n] = hk[:, :, n], hv[:, :, n]
        new_codes[:, :, :n + 1] = c.to(codes.dtype)
    return out, sk, sv, new_hk, new_hv, new_codes, new_mu


@torch.library.custom_op("kvpass::decode_step_capacity", mutates_args=())
def decode_step_capacity(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, static_k: torch.Tensor,
                         static_v: torch.Tensor, host_k: torch.Tensor, host_v: torch.Tensor, codes: torch.Tensor,
                         mu: torch.Tensor, proj: torch.Tensor, logp: torch.Tensor, position: torch.Tensor,
                         sink_size: int, window_size: int, lsh_k: int, threshold: int, estimator: str,
                         scale: float, min_keys: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                               torch.Tensor, torch.Tensor, torch.Tensor]:
    """``decode_step_capacity_reference`` as one graph node; exported as the ``kvpass.DecodeStep`` node
    that the onnxruntime op library (``kvpass.cpu_ops.ort_library``) computes."""
    return decode_step_capacity_reference(q, k_new, v_new, static_k, static_v, host_k, host_v, codes, mu, proj,
                                          logp, position, sink_size, window_size, lsh_k, threshold, estimator,
                                          scale, min_keys)


@decode_step_capacity.register_fake
def _(q, k_new, v_new, static_k, static_v, host_k, host_v, codes, mu, proj, logp, position, sink_size,
      window_size, lsh_k, threshold, estimator, scale, min_keys):
    return (torch.empty_like(q), torch.empty_like(static_k), torch.empty_like(static_v), torch.empty_like(host_k),
            torch.empty_like(host_v), torch.empty_like(codes), torch.empty_like(mu))


_STEP_INPUTS = ("q", "k_new", "v_new", "static_k", "static_v", "host_k", "host_v", "codes", "mu", "proj", "logp",
                "position")
_STEP_OUTPUTS = ("out", "static_k_out", "static_v_out", "host_k_out", "host_v_out", "codes_out", "mu_out")


def register_onnx_schema() -> None:
    """Register the ``kvpass.DecodeStep`` schema (domain ``kvpass``, version 1) with onnx, once per process:
    the exporter needs it to emit the node, and ``onnx.checker`` then validates the node against it."""
    from onnx import defs

    if defs.has("DecodeStep", "kvpass"):
        return
    P, A = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    kind = {"codes": "I", "position": "P"}  # codes: int16 (capacity layout)
    schema = defs.OpSchema(
        "DecodeStep", "kvpass", 1,
        doc="One kvpass decode step of an attention site, state in the capacity layout "
            "(kvpass/lowering/decode_step.py); computed by kvpass's onnxruntime op library.",
        inputs=[P(n, kind.get(n, "F")) for n in _STEP_INPUTS],
        outputs=[P(n, "I" if n == "codes_out" else "F") for n in _STEP_OUTPUTS],
        type_constraints=[("F", ["tensor(float)"], "float32 tensors"), ("I", ["tensor(int16)"], "SimHash codes"),
                          ("P", ["tensor(int64)"], "the new token's position")],
        attributes=[A("sink_size", defs.OpSchema.AttrType.INT, "S"),
                    A("window_size", defs.OpSchema.AttrType.INT, "W"),
                    A("lsh_k", defs.OpSchema.AttrType.INT, "SimHash bits per table"),
                    A("threshold", defs.OpSchema.AttrType.INT, "collisions that retrieve a key"),
                    A("estimator", defs.OpSchema.AttrType.STRING, "exact | sample | none"),
                    A("scale", defs.OpSchema.AttrType.FLOAT, "softmax scale"),
                    A("min_keys", defs.OpSchema.AttrType.INT, "offloaded tokens that build the index")])
    defs.register_schema(schema)


def onnx_decode_step(q, k_new, v_new, static_k, static_v, host_k, host_v, codes, mu, proj, logp, position,
                     sink_size: int, window_size: int, lsh_k: int, threshold: int, estimator: str, scale: float,
                     min_keys: int):
    """The ONNX translation of ``kvpass::decode_step_capacity``: one ``kvpass.DecodeStep`` node (custom
    domain ``kvpass``, version 1), the attributes carrying the op's constants."""
    from onnxscript.values import Opset

    register_onnx_schema()
    return Opset("kvpass", 1).DecodeStep(
        q, k_new, v_new, static_k, static_v, host_k, host_v, codes, mu, proj, logp, position,
        sink_size=sink_size, window_size=window_size, lsh_k=lsh_k, threshold=threshold, estimator=estimator,
        scale=scale, min_keys=min_keys, _outputs=7)
