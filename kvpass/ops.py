"""The ``kvpass::*`` custom ops that a rewritten graph calls, and the small graph-side helpers around them.

Each op has a schema, a fake (meta) kernel for Dynamo/AOT/Inductor, and a docstring with shapes.
``append_kv`` changes runtime state, so it is registered as an ordered effect: the compiler neither
drops it (its handle may be unused, at prefill over a static cache) nor reorders it.
"""

from __future__ import annotations

import gc
import logging

import torch

from kvpass.lowering import dense_attention_with_lse as _dense_ref
from kvpass.lowering import mask_bias as _mask_bias
from kvpass.lowering import merge_partials
from kvpass.lowering import static_attention as _static_ref
from kvpass.runtime import REGISTRY, KVStore, Options

log = logging.getLogger("kvpass")
GC_FLOOR = 64 << 20  # host bytes kvpass's stores may reach before finished sequences are collected


def _new_store(site: str, k: torch.Tensor, config: str) -> KVStore:
    REGISTRY.sweep(site)
    if REGISTRY.collect_pending or REGISTRY.reserved_bytes() > max(2 * REGISTRY.after_collect, GC_FLOOR):
        # A finished sequence's cache can die in a reference cycle — every cache a compile saw does (Dynamo
        # keeps the call's arguments in cycles), and a user's own structures may — which only Python's cycle
        # collector frees: a full collection, ~0.1-0.3 s in a process holding a model.  Run one at the first
        # sequence start after a compile, and whenever the stores' memory has doubled since the last
        # (heap-growth policy: what a finished sequence leaves is bounded by what is live, plus GC_FLOOR),
        # then sweep again.
        REGISTRY.collect_pending = False
        gc.collect()
        REGISTRY.sweep(site)
        REGISTRY.after_collect = REGISTRY.reserved_bytes()
    return KVStore(k.shape[1], k.shape[3], options=Options.from_op_string(config), batch=k.shape[0], dtype=k.dtype,
                   device=k.device, site=site)


@torch.library.custom_op("kvpass::append_kv", mutates_args=())
def append_kv(past_k: torch.Tensor, past_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              positions: torch.Tensor | None, past_len: int, site: str, config: str,
              queries: torch.Tensor | None = None) -> torch.Tensor:
    """Append new K/V of one attention site to its kvpass store; return the store's new handle.

    k, v: [B, Hkv, T, D].  Two cache kinds:
      - growing cache (positions is None; DynamicCache, torch.cat): past_k/past_v are what the model's
        cache held: empty (new sequence), a kvpass placeholder (continue its store) or real KV that was
        filled outside kvpass (adopted into a new store).  past_len = their length.
      - static buffer (positions: [T] int64 absolute positions; StaticCache, gpt-fast): past_k is the
        model's buffer, which names the store; positions[0] == 0 starts a new sequence.
    queries: the new tokens' queries [B, H, T, D] at a prefill whose attention stays the model's, for an
    index fitted to them (retriever "rotated": ``KVStore.observe_queries``), or None.
    Returns the handle [B, Hkv, 1, D] (NaN) that the attention ops and placeholders refer to.
    """
    if positions is None:
        if past_len == 0:
            store = _new_store(site, k, config)
        elif past_k.dim() == 4 and past_k.stride(2) == 0:
            store = placeholder_store(past_k, past_len, site)
        elif (tagged := REGISTRY.by_tags(past_k)) is not None:  # rows of placeholders, copied: beam search
            store, rows = tagged
            if store.site != site or rows.shape[0] != k.shape[0]:
                raise RuntimeError(f"kvpass: site {site}: the cache holds rows of another site's or batch's "
                                   f"kvpass placeholders (store of {store.site}, batch {store.batch})")
            _follow_crop(store, past_len)
            store.reorder(rows)
        else:  # real KV from a cache filled without kvpass: adopt it
            if bool(torch.isnan(past_k).any()):  # copies of placeholders: the KV itself is in a store
                raise RuntimeError(
                    f"kvpass: site {site}: the cache holds NaN where KV should be: copies of kvpass placeholders "
                    f"that lost their tags (a dtype conversion of the cache, or a store already released), or "
                    f"KV that is NaN. kvpass follows beam search's row reorders and crops of the cache, not "
                    f"conversions; start a new sequence with a fresh cache.")
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
            past = past_k[:, :, :p0], past_v[:, :, :p0]
            if p0 != 0 and (past_k.shape[2] < p0 or bool(torch.isnan(past[0]).any())):
                raise RuntimeError(f"kvpass: site {site}: the static cache starts at position {p0}, but its "
                                   f"buffer does not hold the {p0} earlier tokens; prefill through kvpass first")
            store = _new_store(site, k, config)
            REGISTRY.bind_buffer(site, past_k, store)
            if p0 != 0:  # a buffer kvpass has not seen holding earlier tokens: a copied StaticCache (or one
                # filled without kvpass, or beam search's reorder): the model keeps real KV there, so adopt it
                store.append(*past)
                _say_adopted(site, p0)
        elif p0 != store.length:
            raise RuntimeError(f"kvpass: site {site}: writing position {p0} but the store holds "
                               f"{store.length} tokens; rewriting earlier positions is not supported")
        store.append(k, v)
    if queries is not None:
        store.observe_queries(queries)
    handle = REGISTRY.new_handle(store)  # (registers a new store)
    REGISTRY.note_device_kv(k.nbytes + v.nbytes)
    return handle


def placeholder_store(past_k: torch.Tensor, past_len: int, site: str | None = None) -> KVStore:
    """The store that a kvpass placeholder (a cache layer's stride-0 keys) stands for, at the cache's length
    past_len: the placeholder's own store, or — for a copy of a cache (``copy.deepcopy``: one prefix, many
    continuations), or the original after a copy of it went on — a fork of the store whose tags it
    carries: the prefix shared, that store's later tokens cropped away.  ``site``: the attention site
    asking, checked against the store's (None: any)."""
    store = REGISTRY.by_handle(past_k)
    if store is None:
        tagged = REGISTRY.by_tags(past_k)
        if tagged is None:
            raise RuntimeError(
                f"kvpass: site {site}: the cache passed in holds a kvpass placeholder that no live store owns "
                f"(after kvpass.reset() or kvpass.release(cache), or a copy of a cache whose original was "
                f"dropped: keep the original cache alive while its copies decode). Start a new sequence with a "
                f"fresh cache.")
        parent, rows = tagged
        if (site is not None and parent.site != site) or rows.shape[0] != past_k.shape[0] \
                or not torch.equal(rows, torch.arange(rows.shape[0])):
            raise RuntimeError(f"kvpass: site {site}: the cache holds a copy of another site's or batch's kvpass "
                               f"placeholder (store of {parent.site}, batch {parent.batch})")
        log.debug("kvpass: site %s forks its store at %d tokens", parent.site, parent.length)
        store = parent.fork()
    _follow_crop(store, past_len)
    return store


def _say_adopted(site: str, n: int) -> None:
    if "adopted" not in _WARNED:
        _WARNED.add("adopted")
        log.warning("kvpass: a static cache kvpass had not seen holds %d tokens (first at site %s): a copy of a "
                    "cache, one filled without kvpass, or beam search's reorder. kvpass offloads and indexes them "
                    "anew — a full pass over the context each time it happens (for beam search and many forks, a "
                    "DynamicCache shares and follows instead; said once)", n, site)


def _follow_crop(store: KVStore, past_len: int) -> None:
    """The model's cache says past_len tokens: a store holding more drops the rest (``cache.crop``)."""
    if past_len > store.length:
        raise RuntimeError(f"kvpass: site {store.site}: the cache says {past_len} past tokens but the kvpass store "
                           f"holds {store.length}; was the cache edited outside kvpass?")
    if past_len < store.length:
        try:
            store.crop(past_len)
        except ValueError as e:
            raise RuntimeError(str(e)) from None
        log.debug("kvpass: site %s cropped to %d tokens", store.site, past_len)


@append_kv.register_fake
def _(past_k, past_v, k, v, positions, past_len, site, config, queries=None):
    return k.new_empty(k.shape[0], k.shape[1], 1, k.shape[3])


def _store(handle: torch.Tensor, site: str) -> KVStore:
    store = REGISTRY.by_handle(handle)
    if store is None:  # a copy of the handle (a functionalised graph, opcheck): the site's only live store
        live = [s for s in REGISTRY.stores() if s.site == site and s.handle.shape == handle.shape]
        store = live[0] if len(live) == 1 else None
    if store is None:
        raise RuntimeError(f"kvpass: site {site}: no live store for this handle (kvpass.reset() mid-step?)")
    return store


def _left_padding(mask: torch.Tensor, store: KVStore, site: str) -> torch.Tensor | None:
    """Each batch row's first real position ([B] int64; zeros: plain causal) when the model's mask over
    its cache ([.., Tq, L] bool or additive) says exactly "key position j visible to query t iff
    pad[b] <= j <= q_pos[t]" — causal with left padding, which the split applies itself (fast path).
    None for anything else (right padding, a sliding window, additive biases): honoured exactly, slower."""
    q_pos = store.last_positions
    if mask.shape[-1] < store.length or mask.shape[-2] != q_pos.shape[0]:
        raise RuntimeError(f"kvpass: site {site}: attention mask of shape {tuple(mask.shape)} does not cover "
                           f"the {q_pos.shape[0]} queries x {store.length} cached tokens that kvpass holds")
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask == 0
        if not bool(torch.all(allowed | torch.isneginf(mask))):
            return None
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    if allowed.shape[0] not in (1, store.batch):
        return None
    cols = torch.arange(allowed.shape[-1], device=allowed.device)
    pad = allowed[:, 0, -1].int().argmax(-1)  # the last query's first visible key, per batch row
    causal = cols[None, :] <= q_pos[:, None].to(allowed.device)  # [Tq, L]
    expected = causal[None, None] & (cols >= pad[:, None, None, None])
    if not bool(torch.all(allowed == expected)):
        return None
    return pad.long().cpu().expand(store.batch).contiguous()


_WARNED: set[str] = set()


def _say_masked(site: str) -> None:
    """Say once per process (not per site: a padded batch has such a mask at every layer) that a mask
    takes the masked path."""
    if "masked" not in _WARNED:
        _WARNED.add("masked")
        log.warning("kvpass: the attention mask (first at site %s) is neither plain causal nor causal with left "
                    "padding (right padding, a sliding window or a bias); kvpass applies such masks exactly, with "
                    "a slower torch path for the offloaded part (said once; runtime_stats()['masked_steps'] counts "
                    "the steps)", site)


def _block_reaches_host(store: KVStore, q_len: int, site: str) -> bool:
    """A query block longer than the window (a long draft to verify, a prefill chunk) put some of its own
    tokens in the host store at once: the CPU kernel takes every host key as visible to every query, so
    such a step applies the causal mask exactly instead (the masked path; said once)."""
    first_query = store.length - q_len  # the host holds positions [S, S + offloaded)
    if not store.tokens_offloaded or store.sink_size + store.tokens_offloaded <= first_query + 1:
        return False
    if "block" not in _WARNED:
        _WARNED.add("block")
        log.info("kvpass: a block of %d query tokens (first at site %s) is longer than window_size + 1 (a "
                 "prefill chunk, a long draft): it is attended exactly and causally over every stored token, "
                 "in torch (said once; runtime_stats()['masked_steps'] counts the steps)", q_len, site)
    return True


def _masked_static(store: KVStore, q: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float):
    """Static part under a mask that is not plain causal: the mask's columns at the slots' positions."""
    bias = _mask_bias(mask.to(store.device), store.num_kv_heads)
    return _static_ref(q, store.static_k, store.static_v, store.static_pos, store.last_positions, scale, bias,
                       softcap)


def _masked_host(store: KVStore, q: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float):
    """Host part under such a mask, exactly, in plain torch: offloaded token i sits at absolute position
    sink_size + i.  Needs at least one offloaded token."""
    ks, vs = store.host.views()
    S, n = store.sink_size, store.host.length
    bias = _mask_bias(mask.to("cpu"), store.num_kv_heads)[..., S:S + n]
    qh = q.detach().to("cpu", torch.float32)
    out, lse = _dense_ref(qh, torch.cat(ks, 2), torch.cat(vs, 2), scale, bias=bias, softcap=softcap)
    return out.to(q.device), lse.to(q.device)


def _every_token_causal(store: KVStore, q: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the newest query block over every stored token, exactly and causally — the keys laid
    out by position (sinks, host, window) and torch's own SDPA kernel (memory-efficient: a long prefill
    chunk never materialises its [Tq, context] scores).  A CPU store; the block's mask plain causal."""
    pos, slots = store.static_pos.sort()  # empty slots (-1) first
    filled = pos >= 0
    sinks, window = slots[filled & (pos < store.sink_size)], slots[pos >= store.sink_size]
    ks, vs = store.host.views() if store.tokens_offloaded else ([], [])
    k = torch.cat([store.static_k[:, :, sinks], *ks, store.static_k[:, :, window]], 2)
    v = torch.cat([store.static_v[:, :, sinks], *vs, store.static_v[:, :, window]], 2)
    if k.shape[2] != store.length:
        raise RuntimeError(f"kvpass: the store holds {k.shape[2]} of its {store.length} tokens")
    allowed = torch.arange(store.length)[None, :] <= store.last_positions.cpu()[-q.shape[2]:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=allowed, scale=scale,
                                                           enable_gqa=True)
    return out.to(q.dtype)


@torch.library.custom_op("kvpass::split_attention", mutates_args=())
def split_attention_op(q: torch.Tensor, handle: torch.Tensor, mask: torch.Tensor | None, scale: float,
                       estimator: str, cpu_threads: int, site: str, softcap: float = 0.0) -> torch.Tensor:
    """Attention of the newest query block q [B, H, Tq, D] over every token of the store; returns
    [B, H, Tq, D] in q's dtype (scores soft-capped, softcap · tanh(s / softcap), when softcap > 0).  A plain causal mask (or none) goes through KVStore.attend, which picks
    the kernels at run time (a CPU store: one C++ pass over the static slots and the retrieved host
    keys; an accelerator: the CPU partial, then one device pass over the static slots that merges it).
    Any other mask is applied exactly by both parts in torch, then merged (counted in masked_steps).
    """
    # contiguous, whatever q's layout (a block's q is often a transposed view): what the fake kernel promises
    return _split_attention(q, handle, mask, scale, estimator, cpu_threads, site, softcap).contiguous()


def _split_attention(q, handle, mask, scale, estimator, cpu_threads, site, softcap):
    store = _store(handle, site)
    store.cpu_threads = cpu_threads  # the kernel's team (runtime.store.kernel_threads); torch's is untouched
    if _block_reaches_host(store, q.shape[2], site):
        if estimator != "none" and not softcap and store.device.type == "cpu" and (
                mask is None or ((pad := _left_padding(mask, store, site)) is not None and not bool(pad.any()))):
            store.masked_steps += 1  # a prefill chunk: every token, exactly, by torch's SDPA
            return _every_token_causal(store, q, scale)
        if mask is None:
            mask = torch.arange(store.length)[None, :] <= store.last_positions.cpu()[:, None]
    elif mask is None:
        return store.attend(q, estimator=estimator, scale=scale, softcap=softcap)
    elif (pad := _left_padding(mask, store, site)) is not None:  # causal, maybe left-padded: the split
        return store.attend(q, estimator=estimator, scale=scale, row_pad=pad if bool(pad.any()) else None,
                            softcap=softcap)
    else:
        _say_masked(site)
    store.masked_steps += 1
    out, lse = _masked_static(store, q, mask, scale, softcap)
    if estimator != "none" and store.tokens_offloaded:
        out, _ = merge_partials(out, lse, *_masked_host(store, q, mask, scale, softcap))
    return out.to(q.dtype)


@split_attention_op.register_fake
def _(q, handle, mask, scale, estimator, cpu_threads, site, softcap=0.0):
    return q.new_empty(q.shape)  # contiguous


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


def append_growing(past_k, past_v, k, v, site: str, config: str, queries=None) -> torch.Tensor:
    return torch.ops.kvpass.append_kv(past_k, past_v, k, v, None, past_length(past_k), site, config, queries)


def append_static(buf_k, buf_v, k, v, positions, site: str, config: str, queries=None) -> torch.Tensor:
    return torch.ops.kvpass.append_kv(buf_k, buf_v, k, v, positions, 0, site, config, queries)


def placeholder(handle: torch.Tensor, past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """What the model's cache holds instead of K or V: [B, Hkv, past+T, D], stride 0 along tokens."""
    return handle.expand(new.shape[0], new.shape[1], past_length(past) + new.shape[2], new.shape[3])


def split_attention(q, handle, mask, scale: float, estimator: str, cpu_threads: int, site: str,
                    softcap: float = 0.0):
    """The decode step's attention through the store: static part + CPU part + exact merge, [B, H, Tq, D]
    in q's dtype.  One op; how it runs is decided at run time (see kvpass::split_attention)."""
    return torch.ops.kvpass.split_attention(q, handle, mask, scale, estimator, cpu_threads, site, softcap)
