"""Public helpers: explain, runtime_stats, reset."""

from __future__ import annotations

from typing import Any

import torch

from kvpass import backend as _backend
from kvpass.report import Report
from kvpass.runtime import REGISTRY
from kvpass.runtime.config import parse_options


def explain(fn, *args, options: dict[str, Any] | None = None, **kwargs) -> Report:
    """Compile ``fn`` with kvpass in dry-run mode, call it once with ``args``/``kwargs``, and report what
    the pass would do at every attention site of every graph Dynamo produced (``.sites``; print it for a
    table).  The call runs the original, unrewritten graphs under ``torch.no_grad()`` (kvpass rewrites
    inference graphs), so it changes no kvpass state."""
    opts = dict(options or {})
    opts["dryrun"] = True
    parse_options(opts)  # fail early on bad options
    try:
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend=_backend.kvpass_backend, options=opts)
        with _backend.collect_reports() as collected, torch.no_grad():
            compiled(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    merged = Report(graphs=len(collected))
    for r in collected:
        merged.sites.extend(r.sites)
        merged.unmatched.extend(r.unmatched)
    return merged


def runtime_stats() -> dict[str, float]:
    """Bytes and tokens held by live kvpass stores (all sequences, all sites; what forks share counted once),
    and how many sequences are live (a sequence's stores go when its cache is dropped, released, or its slot is prefilled anew).  ``keys_read_fraction``:
    keys the CPU scored at the last decode step, over the offloaded keys, averaged over the stores.
    ``step_code_bytes`` / ``step_row_bytes``: what the CPU kernel read at each store's last host attention
    (the sketch scanned; the distinct K and V rows), summed over the stores, as the kernel counted it;
    ``step_bytes_fraction``: the two over what dense attention reads of the same host keys."""
    stores = REGISTRY.stores()
    read = [s.last_keys_read / s.tokens_offloaded for s in stores if s.tokens_offloaded]
    step = [s.last_step_reads for s in stores if s.batch]
    step_code, step_rows = sum(r["code_bytes"] for r in step), sum(r["row_bytes"] for r in step)
    step_dense = sum(r["dense_bytes"] for r in step)  # 0 for a store the kernel has not read yet
    seen, projection = set(), 0
    for s in stores:  # one projection per site, shared by its sequences
        if s.batch and s.site not in seen:
            seen.add(s.site)
            projection += s.index.projection_bytes
    blocks: dict[int, tuple[int, int]] = {}  # host blocks by address: a fork shares its parent's (count once)
    index: dict[int, int] = {}
    for s in stores:
        if s.batch:
            for ptr, (used, reserved) in s.host.block_bytes().items():
                blocks[ptr] = (max(used, blocks.get(ptr, (0, 0))[0]), reserved)
            for ptr, n in s.index.held_bytes().items():
                index[ptr] = max(n, index.get(ptr, 0))
    per_site: dict[str, int] = {}
    for s in stores:
        per_site[s.site] = per_site.get(s.site, 0) + 1
    return {
        "stores": len(stores),
        "sequences": max(per_site.values(), default=0),  # live sequences (each has one store per site)
        "device_kv_bytes": sum(s.device_bytes for s in stores),
        # the most KV on the model's device at once since kvpass.reset(): the static slots plus the block
        # a layer was appending (a prefill's whole prompt for that one layer, or one prefill chunk)
        "peak_device_kv_bytes": REGISTRY.peak_device_kv,
        "host_kv_bytes": sum(used for used, _ in blocks.values()),
        "host_reserved_bytes": sum(reserved for _, reserved in blocks.values()),
        "tokens_offloaded": sum(s.tokens_offloaded for s in stores),
        "masked_steps": sum(s.masked_steps for s in stores),
        "reorders": sum(s.reorders for s in stores),  # beam search's batch reorders followed (per store)
        "crops": sum(s.crops for s in stores),        # cache crops followed (rejected drafts; per store)
        "index_bytes": sum(index.values()),
        "projection_bytes": projection,
        "keys_read_fraction": sum(read) / len(read) if read else 0.0,
        "step_code_bytes": step_code,
        "step_row_bytes": step_rows,
        "step_bytes_fraction": (step_code + step_rows) / step_dense if step_dense else 0.0,
    }


def release(cache) -> int:
    """Free the kvpass stores behind a model cache whose sequence is finished (a transformers ``Cache``:
    its layers' keys and values; or any iterable of the cache's tensors).  Returns the number of stores
    freed.  The cache cannot continue through kvpass afterwards (its next step raises a clear error)."""
    layers = getattr(cache, "layers", None)
    tensors = [t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))] \
        if layers is not None else list(cache)
    return REGISTRY.release(tensors)


def reset() -> None:
    """Drop every kvpass store.  Caches that still hold kvpass placeholders become unusable."""
    REGISTRY.clear()
