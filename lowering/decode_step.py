"""The decode step of one attention site with its state explicit: the form kvpass exports (ONNX).

The compiled path keeps each site's KV in a ``KVStore`` (runtime state behind a handle).  An exported
graph cannot reach Python objects, so there the state travels as tensors, in the store's own layout
(``kvpass.runtime.store.KVStore``; B batch, Hkv kv heads, D head_dim, S sinks, W window, N host tokens,
L tables of K bits):

    static_k, static_v  [B, Hkv, S+W, D]   sink slots, then the window ring: position p ≥ S sits in
                                           slot S + (p − S) mod W
    host_k, host_v      [B, Hkv, N, D]     host token i is position S + i
    codes               [B, Hkv, N, L]     int32 SimHash codes of host_k − mu
    mu                  [B, Hkv, D]        fp32 key centre (frozen when the index was built)
    proj                [Hkv, D, K·L]      fp32 (bf16 values) projection of the site  — a constant
    logp                [16385]            fp32 log P(retrieved | cos θ) on a cos θ grid — a constant
                                           (``reference.logp_table``)

One step at ``position`` (the new token's absolute position) requires a full ring and a built index —
position ≥ S + W and N ≥ the index's min_keys — which any prompt of ``S + W + 256`` tokens gives:
the token leaving the window (position − W) moves to the host store (and its code to ``codes``), the
new token takes its slot, then attention = static part (exact) ⊕ host part (the estimator), merged
through the log-sum-exp.  Exactly what ``KVStore.append`` + ``KVStore.attend`` compute; the host part's
retrieval is the dense-cost equivalent of the C++ kernel's bucket lookups (same codes, same threshold,
same log P table and interpolation), so the result is the same.

``kvpass::decode_step`` is a custom op whose implementation is ``decode_step_reference`` (plain torch):
an exported graph shows it as one node; the portable ONNX translation decomposes it into standard ops.
"""

from __future__ import annotations

import torch
from kvpass.lowering.attention import merge_partials, softmax_lse
from kvpass.lowering.reference import estimator_scores, hash_codes, ring_slot

EXPORT_ESTIMATORS = ("exact", "sample", "none")


def decode_step_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, static_k: torch.Tensor,
                          static_v: torch.Tensor, host_k: torch.Tensor, host_v: torch.Tensor, codes: torch.Tensor,
                          mu: torch.Tensor, proj: torch.Tensor, logp: torch.Tensor, position: torch.Tensor,
                          sink_size: int, window_size: int, lsh_k: int, threshold: int, estimator: str,
                          scale: float) -> tuple[torch.Tensor, ...]:
    """One decode step (see the module docstring).  q [B, H, 1, D]; k_new, v_new [B, Hkv, 1, D].
    Returns (out [B, H, 1, D] in q's dtype, static_k, static_v, host_k, host_v, codes) — the state after
    the step (host tensors one token longer)."""
    if estimator not in EXPORT_ESTIMATORS:
        raise ValueError(f"kvpass: estimator {estimator!r} cannot be exported; one of {EXPORT_ESTIMATORS}")
    B, H, _, D = q.shape
    Hkv = k_new.shape[1]
    S, W = sink_size, window_size
    slot = ring_slot(position, S, W).reshape(1)
    leaving_k, leaving_v = static_k.index_select(2, slot), static_v.index_select(2, slot)
    here = (torch.arange(S + W, device=q.device) == slot)[:, None]  # [S+W, 1]
    new_sk = torch.where(here, k_new.to(static_k.dtype), static_k)
    new_sv = torch.where(here, v_new.to(static_v.dtype), static_v)
    new_hk = torch.cat([host_k, leaving_k.to(host_k.dtype)], 2)
    new_hv = torch.cat([host_v, leaving_v.to(host_v.dtype)], 2)
    new_codes = torch.cat([codes, hash_codes(leaving_k.float() - mu[:, :, None], proj, lsh_k)], 2)

    qg = q.float().reshape(B, Hkv, H // Hkv, 1, D)
    s_static = (qg @ new_sk.float().transpose(-1, -2)[:, :, None]) * scale  # every slot is ≤ position: no mask
    out, lse = softmax_lse(s_static, new_sv.float())
    if estimator != "none":
        q_codes = hash_codes(qg.reshape(B, Hkv, -1, D), proj, lsh_k).reshape(B, Hkv, H // Hkv, 1, -1)
        s, _ = estimator_scores(qg, new_hk.float(), scale, estimator, q_codes=q_codes, k_codes=new_codes, mu=mu,
                                logp=logp, threshold=threshold)
        out, _ = merge_partials(out, lse, *softmax_lse(s, new_hv.float()))
    return (out.reshape(B, H, 1, D).to(q.dtype), new_sk, new_sv, new_hk, new_hv, new_codes)


@torch.library.custom_op("kvpass::decode_step", mutates_args=())
def decode_step(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, static_k: torch.Tensor,
                static_v: torch.Tensor, host_k: torch.Tensor, host_v: torch.Tensor, codes: torch.Tensor,
                mu: torch.Tensor, proj: torch.Tensor, logp: torch.Tensor, position: torch.Tensor, sink_size: int,
                window_size: int, lsh_k: int, threshold: int, estimator: str,
                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor]:
    """``decode_step_reference`` as one graph node (outputs never alias inputs)."""
    return tuple(t.clone() if any(t is a for a in (static_k, static_v, host_k, host_v, codes)) else t
                 for t in decode_step_reference(q, k_new, v_new, static_k, static_v, host_k, host_v, codes, mu,
                                                proj, logp, position, sink_size, window_size, lsh_k, threshold,
                                                estimator, scale))


@decode_step.register_fake
def _(q, k_new, v_new, static_k, static_v, host_k, host_v, codes, mu, proj, logp, position, sink_size,
      window_size, lsh_k, threshold, estimator, scale):
    B, Hkv, N, D = host_k.shape
    return (torch.empty_like(q), torch.empty_like(static_k), torch.empty_like(static_v),
            host_k.new_empty(B, Hkv, N + 1, D), host_v.new_empty(B, Hkv, N + 1, host_v.shape[3]),
            codes.new_empty(B, Hkv, N + 1, codes.shape[3]))


# ---------------------------------------------------------------- the capacity layout (onnx_lsh="custom")
#
# The custom onnxruntime op updates the state in place when the caller binds each state output to its
# input's buffer, so there the host tensors do not grow: host_k/host_v/codes are [B, Hkv, CAP, ·]
# buffers whose first N = position − S − W rows are the host tokens (the rest free capacity), and a
# step writes row N; the codes are int16 (lsh_k ≤ 15; half the bytes the op streams each step).  Same
# maths as above; only the layout differs.

def decode_step_capacity_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, static_k: torch.Tensor,
                                   static_v: torch.Tensor, host_k: torch.Tensor, host_v: torch.Tensor,
                                   codes: torch.Tensor, mu: torch.Tensor, proj: torch.Tensor, logp: torch.Tensor,
                                   position: torch.Tensor, sink_size: int, window_size: int, lsh_k: int,
                                   threshold: int, estimator: str, scale: float) -> tuple[torch.Tensor, ...]:
    """``decode_step_reference`` in the capacity layout: returns (out, static_k, static_v, host_k, host_v,
    codes) with the host buffers the same size as given, row N = position − S − W written."""
    n = int(position) - sink_size - window_size
    cap = host_k.shape[2]
    if not 0 <= n < cap:
        raise ValueError(f"kvpass: the step at position {int(position)} writes host row {n}; the host buffers "
                         f"hold {cap} rows (need 0 <= row < capacity)")
    out, sk, sv, hk, hv, c = decode_step_reference(
        q, k_new, v_new, static_k, static_v, host_k[:, :, :n], host_v[:, :, :n], codes[:, :, :n].to(torch.int32), mu,
        proj, logp, position, sink_size, window_size, lsh_k, threshold, estimator, scale)
    new_hk, new_hv, new_codes = host_k.clone(), host_v.clone(), codes.clone()
    new_hk[:, :, n], new_hv[:, :, n], new_codes[:, :, n] = hk[:, :, n], hv[:, :, n], c[:, :, n].to(codes.dtype)
    return out, sk, sv, new_hk, new_hv, new_codes


@torch.library.custom_op("kvpass::decode_step_capacity", mutates_args=())
def decode_step_capacity(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, static_k: torch.Tensor,
                         static_v: torch.Tensor, host_k: torch.Tensor, host_v: torch.Tensor, codes: torch.Tensor,
                         mu: torch.Tensor, proj: torch.Tensor, logp: torch.Tensor, position: torch.Tensor,
                         sink_size: int, window_size: int, lsh_k: int, threshold: int, estimator: str,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
    """``decode_step_capacity_reference`` as one graph node; exported as the ``kvpass.DecodeStep`` node
    that the onnxruntime op library (``kvpass.cpu_ops.ort_library``) computes."""
    return decode_step_capacity_reference(q, k_new, v_new, static_k, static_v, host_k, host_v, codes, mu, proj,
                                          logp, position, sink_size, window_size, lsh_k, threshold, estimator,
                                          scale)


@decode_step_capacity.register_fake
def _(q, k_new, v_new, static_k, static_v, host_k, host_v, codes, mu, proj, logp, position, sink_size,
      window_size, lsh_k, threshold, estimator, scale):
    return (torch.empty_like(q), torch.empty_like(static_k), torch.empty_like(static_v), torch.empty_like(host_k),
            torch.empty_like(host_v), torch.empty_like(codes))


_STEP_INPUTS = ("q", "k_new", "v_new", "static_k", "static_v", "host_k", "host_v", "codes", "mu", "proj", "logp",
                "position")
_STEP_OUTPUTS = ("out", "static_k_out", "static_v_out", "host_k_out", "host_v_out", "codes_out")


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
                    A("scale", defs.OpSchema.AttrType.FLOAT, "softmax scale")])
    defs.register_schema(schema)


def onnx_decode_step(q, k_new, v_new, static_k, static_v, host_k, host_v, codes, mu, proj, logp, position,
                     sink_size: int, window_size: int, lsh_k: int, threshold: int, estimator: str, scale: float):
    """The ONNX translation of ``kvpass::decode_step_capacity``: one ``kvpass.DecodeStep`` node (custom
    domain ``kvpass``, version 1), the attributes carrying the op's constants."""
    from onnxscript.values import Opset

    register_onnx_schema()
    return Opset("kvpass", 1).DecodeStep(
        q, k_new, v_new, static_k, static_v, host_k, host_v, codes, mu, proj, logp, position,
        sink_size=sink_size, window_size=window_size, lsh_k=lsh_k, threshold=threshold, estimator=estimator,
        scale=scale, _outputs=6)
