"""Prefilled contexts that outlive the process: prefill a long document once, save it, load it (in memory
or memory-mapped) and ask it many questions, each from a fork (``copy.deepcopy`` of the loaded cache).

A context is a folder of two files, written atomically (a temporary folder, then a rename):

- ``context.json``: the format, the kvpass version, the model's fingerprint (its config and a checksum of
  its weights), each cache layer's description (a kvpass store's meta, or a dense layer), and the SHA-256
  of the tensor file;
- ``context.safetensors``: every store's tensors — static slots, host KV in regular blocks, the index.

Loading checks all of it before anything is registered: a truncated or altered file, another model, another
kvpass release or other options are refused with the reason.  ``mmap=True`` maps the host KV and the
sketch instead of reading them: a step reads only the rows it attends (a private mapping: appends never
reach the file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from kvpass.ops import placeholder_store
from kvpass.runtime import REGISTRY, KVStore, parse_options

log = logging.getLogger("kvpass")
FORMAT = "kvpass-context/1"
_JSON, _TENSORS = "context.json", "context.safetensors"


class ContextError(ValueError):
    """A saved context that cannot be loaded here (damaged, or made for another model, release or options)."""


def prefill(model, ids: torch.Tensor, *, chunk: int = 2048, progress: bool = True):
    """A ``DynamicCache`` holding the prompt ``ids`` [1, T] (T >= 2), for a model whose ``forward`` kvpass
    compiled (``model.forward = torch.compile(model.forward, backend="kvpass", ...)``).

    The first T - 1 tokens run through the model's own forward (the class's, not the compiled one) in
    chunks of ``chunk`` tokens, with a progress bar; the last token runs through kvpass, which takes that
    KV over in one append — its index built over the whole prompt at once, as a one-shot prefill builds it.
    Peak memory: the prompt's dense KV twice, for that one step."""
    from transformers import DynamicCache

    from kvpass.hf import cache_kwarg

    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        raise ValueError(f"kvpass: prefill takes one prompt of >= 2 tokens, ids [1, T]; got {tuple(ids.shape)}")
    key = cache_kwarg()
    cache = DynamicCache(config=model.config)
    forward = type(model).forward  # the uncompiled forward
    with torch.no_grad():
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=ids.shape[1], desc="prefill", unit="tok")
        for t in range(0, ids.shape[1] - 1, chunk):
            block = ids[:, t:min(t + chunk, ids.shape[1] - 1)]
            forward(model, input_ids=block, **{key: cache}, logits_to_keep=1)
            if bar is not None:
                bar.update(block.shape[1])
        model(input_ids=ids[:, -1:], **{key: cache}, logits_to_keep=1)  # kvpass adopts the KV
        if bar is not None:
            bar.update(1)
            bar.close()
    return cache


def model_fingerprint(model) -> str:
    """SHA-256 of the model's config and of a checksum of every parameter (name, shape, dtype and sum): the
    same weights give the same fingerprint; another model, or the same one fine-tuned, another."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{p.dtype}{float(p.detach().double().sum()):.17g}".encode())
    return h.hexdigest()


def _version() -> str:
    import kvpass

    return kvpass.__version__


def _layer_store(keys: torch.Tensor, index: int) -> KVStore | None:
    """The store behind a cache layer's keys: None for a dense layer (real KV)."""
    if keys.dim() != 4 or keys.stride(2) != 0:
        return None
    try:  # a copy of a cache, not yet decoded from: a fork of the store it was copied from, at its length
        store = placeholder_store(keys, keys.shape[2])
    except RuntimeError as e:
        raise ContextError(f"kvpass: cache layer {index}: {e}") from None
    if store.length != keys.shape[2]:
        raise ContextError(f"kvpass: cache layer {index} says {keys.shape[2]} tokens, its store holds {store.length}")
    return store


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def save_context(cache, path: str | os.PathLike, model) -> Path:
    """Write the prefilled context that ``cache`` (a ``DynamicCache`` decoded through kvpass) holds to the
    folder ``path`` (replaced atomically when it exists).  Returns the folder."""
    from safetensors.torch import save_file

    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        raise ContextError("kvpass: save_context takes a transformers DynamicCache of full-attention layers (a "
                           "sliding-window or static cache is not supported yet)")
    path = Path(path)
    described, tensors = [], {}
    for i, layer in enumerate(layers):
        store = _layer_store(layer.keys, i)
        if store is None:
            described.append({"dense": True})
            tensors[f"{i}.keys"], tensors[f"{i}.values"] = layer.keys.detach().cpu().contiguous(), \
                layer.values.detach().cpu().contiguous()
            continue
        meta, state = store.state()
        described.append(meta)
        tensors.update({f"{i}.{k}": t for k, t in state.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, tmp / _TENSORS)
        header = {"format": FORMAT, "kvpass": _version(), "torch": torch.__version__.split("+")[0],
                  "model": model_fingerprint(model), "tokens": cache.get_seq_length(), "layers": described,
                  "sha256": _sha256(tmp / _TENSORS)}
        (tmp / _JSON).write_text(json.dumps(header, indent=1))
        if path.exists():  # replace: the old folder goes only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("kvpass: saved a %d-token context to %s", header["tokens"], path)
    return path


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a saved context (ContextError when it is missing or unreadable)."""
    try:
        header = json.loads((Path(path) / _JSON).read_text())
    except (OSError, ValueError) as e:
        raise ContextError(f"kvpass: {path} is not a readable kvpass context ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ContextError(f"kvpass: {path} is not a {FORMAT} context (format {header.get('format')!r})"
                           if isinstance(header, dict) else f"kvpass: {path}: its header is not an object")
    return header


def load_context(path: str | os.PathLike, model, *, options=None, mmap: bool = False, verify: bool = True):
    """A ``DynamicCache`` holding the context saved at ``path``, for ``model`` (compiled with kvpass, with the
    options the context was saved with).  ``options``: the kvpass options the model is compiled with
    (dict or ``Options``); a context saved under others is refused.  ``mmap``: map the host KV and the
    sketch instead of reading them into memory.  ``verify``: check the tensor file's SHA-256 (reads the
    whole file once; a damaged file is refused either way where its structure shows it).

    Decode from it, or ``copy.deepcopy`` it for each question (forks share the context)."""
    from safetensors import safe_open
    from transformers import DynamicCache

    path = Path(path)
    header = read_header(path)
    if header.get("kvpass") != _version():
        raise ContextError(f"kvpass: {path} was saved by kvpass {header.get('kvpass')}, this is {_version()}")
    if header.get("model") != model_fingerprint(model):
        raise ContextError(f"kvpass: {path} was saved for another model (or other weights) than this one")
    tensor_file = path / _TENSORS
    if verify and _sha256(tensor_file) != header.get("sha256"):
        raise ContextError(f"kvpass: {tensor_file} is damaged: its SHA-256 differs from the one saved")
    want = parse_options(options).to_op_string() if options is not None else None
    layers = header["layers"]
    if len(layers) != model.config.num_hidden_layers:
        raise ContextError(f"kvpass: {path} holds {len(layers)} layers, the model has {model.config.num_hidden_layers}")
    device = next(model.parameters()).device
    try:
        with safe_open(str(tensor_file), framework="pt") as f:
            names = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in names}
    except Exception as e:  # a truncated or garbled file: safetensors says what
        raise ContextError(f"kvpass: {tensor_file} cannot be read as safetensors ({e})") from None
    if not mmap:  # into this process's memory (the mapping goes with it)
        tensors = {k: t.clone() for k, t in tensors.items()}
    stores: list[KVStore | None] = []
    try:
        for i, meta in enumerate(layers):
            if meta.get("dense"):
                stores.append(None)
                continue
            if want is not None and meta["options"] != want:
                raise ContextError(f"kvpass: {path} was saved with other kvpass options than these: saved "
                                   f"{meta['options']}, given {want}")
            state = {k[len(f"{i}."):]: t for k, t in tensors.items() if k.startswith(f"{i}.")}
            stores.append(KVStore.from_state(meta, state, device))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, ContextError):
            raise
        raise ContextError(f"kvpass: {path} does not describe a context this kvpass can load ({type(e).__name__}: "
                           f"{e})") from None
    cache = DynamicCache(config=model.config)
    for i, (layer, store) in enumerate(zip(cache.layers, stores)):
        if store is None:
            k, v = tensors[f"{i}.keys"].to(device), tensors[f"{i}.values"].to(device)
        else:
            handle = REGISTRY.new_handle(store)
            shape = (store.batch, store.num_kv_heads, store.length, store.head_dim)
            k, v = handle.expand(shape), handle.expand(shape)  # as the rewritten graph leaves them
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    log.info("kvpass: loaded a %d-token context from %s%s", header["tokens"], path, " (memory-mapped)" if mmap else "")
    return cache
