"""Builds and loads the ``kvpass_cpu`` C++ ops (``torch.utils.cpp_extension``), once per process."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger("kvpass")

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = sorted(_CSRC.glob("*.cpp"))
_lock = threading.Lock()
_loaded = False


def _cpu_signature() -> str:
    """Hash of the CPU's feature flags: the build uses -march=native, so a cache shared between
    machines (an NFS home, a container image) must never hand one CPU's binary to another."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _source_signature() -> str:
    """Hash of the sources and of the torch build they compile against (its ABI and headers)."""
    h = hashlib.sha1(torch.__version__.encode())
    for src in _SOURCES:
        h.update(src.read_bytes())
    return h.hexdigest()[:8]


def load() -> None:
    """Build (first use, ~15 s) or load (cached, ~0.1 s) the C++ ops.  Idempotent and thread-safe.

    Raises ``RuntimeError`` naming what is missing when no C++ compiler or ninja is available.
    """
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            raise RuntimeError(
                f"kvpass: the CPU attention kernel is built on first use and needs a C++17 compiler, but "
                f"'{compiler}' is not on PATH. Install one (e.g. `apt-get install g++`) or set CXX."
            )
        from torch.utils import cpp_extension

        try:
            cpp_extension.verify_ninja_availability()
        except RuntimeError as e:
            raise RuntimeError("kvpass: building the CPU kernel needs ninja: `pip install ninja`.") from e
        name = f"kvpass_cpu_{_source_signature()}_{_cpu_signature()}"
        log.info("kvpass: loading CPU kernels (%s); the first build takes ~15 s", name)
        try:
            cpp_extension.load(
                name=name,
                sources=[str(s) for s in _SOURCES],
                extra_cflags=["-O3", "-std=c++17", "-fopenmp", "-march=native", "-ffp-contract=fast"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
        except Exception as e:  # a compiler error is long; keep it, and say what failed first
            raise RuntimeError(
                f"kvpass: building the CPU kernel {name} failed ({type(e).__name__}). If a previous build "
                f"was killed, remove the stale lock in $TORCH_EXTENSIONS_DIR/{name}. Details:\n{e}"
            ) from e
        _loaded = True


def host_attention(
    q: torch.Tensor, k_blocks: list[torch.Tensor], v_blocks: list[torch.Tensor], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a query block over host KV blocks, GQA-native, fp32 accumulation.

    q: [B, H, Tq, D] float32 (CPU).  k_blocks[i], v_blocks[i]: [B, Hkv, N_i, D] float32/bfloat16/float16
    (CPU, head_dim contiguous, any other strides).  Returns out [B, H, Tq, D] float32 and
    lse [B, H, Tq] float32 (natural log of the softmax denominator; -inf and out = 0 when no keys).
    """
    load()
    return torch.ops.kvpass_cpu.host_attention(q, k_blocks, v_blocks, scale)
