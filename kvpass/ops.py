"""The ``kvpass::*`` custom ops that a rewritten graph calls, and the small graph-side helpers around them.

Each op has a schema, a fake (meta) kernel for Dynamo/AOT/Inductor, and a docstring with shapes.
``append_kv`` changes runtime state, so it is registered as an ordered effect: the compiler neither
drops it (its handle may be unused, at prefill over a static cache) nor reorders it.
"""

from __future__ import annotations

import functools
import json
import logging

import torch

from kvpass.cpu_ops import host_attention as _host_kernel
from kvpass.lowering import merge_partials
from kvpass.lowering import static_attention as _static_ref
from kvpass.runtime import REGISTRY, LayerKV

log = logging.getLogger("kvpass")


@functools.cache
def _config(config: str) -> dict:
    return json.loads(config)


def _new_store(site: str, k: torch.Tensor, config: str) -> LayerKV:
    cfg = _config(config)
    REGISTRY.sweep(site)
    store = LayerKV(k.shape[0], k.shape[1], k.shape[3], dtype=k.dtype, device=k.device,
                    sink_size=cfg["sink_size"], window_size=cfg["window_size"],
                    host_block_size=cfg["host_block_size"])
    store.site = site
    return store


@torch.library.custom_op("kvpass::append_kv", mutates_args=())
def append_kv(past_k: torch.Tensor, past_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              positions: torch.Tensor | None, past_len: int, site: str, config: str) -> torch.Tensor:
    """Append new K/V of one attention site to its kvpass store; return the store's new handle.

    k, v: [B, Hkv, T, D].  Two cache kinds:
      - growing cache (positions is None; DynamicCache, torch.cat): past_k/past_v are what the model's
        cache held: empty (new sequence), a kvpass placeholder (continue its store) or real KV that was
        filled outside kvpass (adopted into a new store).  past_len = their length.
      - static buffer (positions: [T] int64 absolute positions; StaticCache, gpt-fast): past_k is the
        model's buffer, which names the store; positions[0] == 0 starts a new sequence.
    Returns the handle [B, Hkv, 1, D] (NaN) that the attention ops and placeholders refer to.
    """
    if positions is None:
        if past_len == 0:
            store = _new_store(site, k, config)
        elif past_k.dim() == 4 and past_k.stride(2) == 0:
            store = REGISTRY.by_handle(past_k)
            if store is None:
                raise RuntimeError(
                    f"kvpass: site {site}: the cache passed in holds a kvpass placeholder that no live store "
                    f"owns (after kvpass.reset(), or a cache reordered/copied outside kvpass, e.g. beam "
                    f"search). Start a new sequence with a fresh cache.")
            if store.length != past_len:
                raise RuntimeError(f"kvpass: site {site}: the cache says {past_len} past tokens but the "
                                   f"kvpass store holds {store.length}; was the cache cropped or edited?")
        else:  # real KV from a cache filled without kvpass: adopt it
            store = _new_store(site, k, config)
            store.append(past_k, past_v)
            log.info("kvpass: site %s adopted %d cached tokens", site, past_len)
        store.append(k, v)
    else:
        p0 = int(positions[0])
        expected = torch.arange(p0, p0 + k.shape[2], device=positions.device)
        if positions.shape[0] != k.shape[2] or not torch.equal(positions, expected):
            raise RuntimeError(f"kvpass: site {site}: cache positions {positions.tolist()} are not "
                               f"consecutive; kvpass appends tokens in order")
        store = REGISTRY.by_buffer(site, past_k)
        if p0 == 0 or store is None:
            if p0 != 0:
                raise RuntimeError(f"kvpass: site {site}: the static cache starts at position {p0}, but "
                                   f"kvpass saw no earlier tokens for it; prefill through kvpass first")
            store = _new_store(site, k, config)
            REGISTRY.bind_buffer(site, past_k, store)
        elif p0 != store.length:
            raise RuntimeError(f"kvpass: site {site}: writing position {p0} but the store holds "
                               f"{store.length} tokens; rewriting earlier positions is not supported")
        store.append(k, v)
    return REGISTRY.new_handle(store)


@append_kv.register_fake
def _(past_k, past_v, k, v, positions, past_len, site, config):
    return k.new_empty(k.shape[0], k.shape[1], 1, k.shape[3])


def _store(handle: torch.Tensor, site: str) -> LayerKV:
    store = REGISTRY.by_handle(handle)
    if store is None:
        raise RuntimeError(f"kvpass: site {site}: no live store for this handle (kvpass.reset() mid-step?)")
    return store


def _check_mask(mask: torch.Tensor, q_pos: torch.Tensor, site: str) -> None:
    """kvpass honours only causal masks: key slot j visible to query t iff j <= q_pos[t]."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if mask.dtype != torch.bool and not bool(torch.all((mask == 0) | torch.isneginf(mask))):
        raise RuntimeError(f"kvpass: site {site}: the attention mask carries additive biases; kvpass "
                           f"cannot honour them. Keep this layer dense with options={{'dense_layers': [...]}}.")
    n = allowed.shape[-1]
    causal = torch.arange(n, device=mask.device)[None, :] <= q_pos[:, None].to(mask.device)  # [T, n]
    if not bool(torch.all(allowed == causal)):
        raise RuntimeError(
            f"kvpass: site {site}: the attention mask is not plain causal over the cache (padding, a "
            f"sliding window or a custom pattern). kvpass cannot honour it; run this batch without "
            f"padding or keep the layer dense with options={{'dense_layers': [...]}}.")


@torch.library.custom_op("kvpass::static_attention", mutates_args=())
def static_attention_op(q: torch.Tensor, handle: torch.Tensor, mask: torch.Tensor | None, scale: float,
                        site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the newest query block over the store's sinks + window (on the model's device).

    q: [B, H, Tq, D] (the Tq tokens just appended); mask: the model's mask over its own cache
    ([.., Tq, L] bool or additive), checked to be causal, or None.  Returns out [B, H, Tq, D] fp32,
    lse [B, H, Tq] fp32.
    """
    store = _store(handle, site)
    q_pos = store.last_positions
    if q.shape[2] != q_pos.shape[0]:
        raise RuntimeError(f"kvpass: site {site}: {q.shape[2]} queries but {q_pos.shape[0]} new keys")
    if mask is not None:
        _check_mask(mask, q_pos, site)
    return _static_ref(q, store.static_k, store.static_v, store.static_pos, q_pos, scale)


@static_attention_op.register_fake
def _(q, handle, mask, scale, site):
    return q.new_empty(q.shape, dtype=torch.float32), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("kvpass::host_attention", mutates_args=())
def host_attention_op(q: torch.Tensor, handle: torch.Tensor, scale: float, estimator: str,
                      cpu_threads: int, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the query block over the store's offloaded (host) tokens, computed by the CPU.

    q: [B, H, Tq, D] on the model's device (copied to the host as fp32: B*H*Tq*D floats, the only data
    that crosses).  estimator "exact": every offloaded key.  cpu_threads <= 0: torch's setting.
    Returns out [B, H, Tq, D] fp32, lse [B, H, Tq] fp32 on q's device (-inf where nothing is offloaded).
    """
    store = _store(handle, site)
    if estimator != "exact":
        raise ValueError(f"kvpass: estimator {estimator!r} is not implemented in the CPU kernel")
    ks, vs = store.host.views()
    qh = q.detach().to("cpu", torch.float32)
    if cpu_threads > 0 and torch.get_num_threads() != cpu_threads:
        torch.set_num_threads(cpu_threads)
    out, lse = _host_kernel(qh, ks, vs, scale)
    return out.to(q.device), lse.to(q.device)


@host_attention_op.register_fake
def _(q, handle, scale, estimator, cpu_threads, site):
    return q.new_empty(q.shape, dtype=torch.float32), q.new_empty(q.shape[:-1], dtype=torch.float32)


try:  # torch >= 2.11 spells it in torch.library; older releases in the effects module
    from torch.library import _register_effectful_op as _effectful
except ImportError:  # pragma: no cover
    from torch._higher_order_ops.effects import _register_effectful_op as _effectful
from torch._higher_order_ops.effects import _EffectType

_effectful("kvpass::append_kv", _EffectType.ORDERED)


# ---- graph-side helpers: plain functions the rewritten FX graph calls (traced through by AOT) ----

def past_length(past: torch.Tensor) -> int:
    """Tokens in a growing cache's past (DynamicCache starts from a 1-D empty tensor)."""
    return past.shape[-2] if past.dim() == 4 else 0


def append_growing(past_k, past_v, k, v, site: str, config: str) -> torch.Tensor:
    return torch.ops.kvpass.append_kv(past_k, past_v, k, v, None, past_length(past_k), site, config)


def append_static(buf_k, buf_v, k, v, positions, site: str, config: str) -> torch.Tensor:
    return torch.ops.kvpass.append_kv(buf_k, buf_v, k, v, positions, 0, site, config)


def placeholder(handle: torch.Tensor, past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """What the model's cache holds instead of K or V: [B, Hkv, past+T, D], stride 0 along tokens."""
    return handle.expand(new.shape[0], new.shape[1], past_length(past) + new.shape[2], new.shape[3])


def split_attention(q, handle, mask, scale: float, estimator: str, cpu_threads: int, site: str):
    """o = merge(static part on the device, offloaded part on the CPU), cast back to q's dtype."""
    out_s, lse_s = torch.ops.kvpass.static_attention(q, handle, mask, scale, site)
    if estimator == "none":
        return out_s.to(q.dtype)
    out_d, lse_d = torch.ops.kvpass.host_attention(q, handle, scale, estimator, cpu_threads, site)
    out, _ = merge_partials(out_s, lse_s, out_d, lse_d)
    return out.to(q.dtype)
