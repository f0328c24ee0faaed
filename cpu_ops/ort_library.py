"""Builds the onnxruntime custom-op library (``ort/kvpass_ort.cc``) for ``onnx_lsh="custom"`` exports.

The library is plain C++17/OpenMP with no onnxruntime or torch headers (see the source's opening comment),
compiled once per source and CPU kind with the system compiler and cached next to the torch extensions
(``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``).  Register it with
``SessionOptions.register_custom_ops_library(ort_library_path())`` — or let ``kvpass.onnx_session`` do it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from kvpass.cpu_ops.loader import _cpu_signature, build_flags

log = logging.getLogger("kvpass")

_SOURCE = Path(__file__).parent / "ort" / "kvpass_ort.cc"
_HEADERS = [Path(__file__).parent / "csrc" / "kvpass_math.h"]  # shared with the torch kernels
_SHARED = ["-shared", "-fPIC", "-fvisibility=hidden"]
_lock = threading.Lock()


def _cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "torch_extensions")
    return Path(root) / "kvpass_ort"


def ort_library_path() -> str:
    """Path of the built library (built on first use, ~3 s; cached).  Raises ``RuntimeError`` naming what
    is missing when there is no C++ compiler, with the compiler's message when the build fails."""
    compiler = os.environ.get("CXX", "c++")
    cflags, ldflags, suffix = build_flags()
    flags = [*cflags, *_SHARED, *ldflags]
    h = hashlib.sha1(b"".join(p.read_bytes() for p in (_SOURCE, *_HEADERS)) + " ".join(flags).encode())
    h = h.hexdigest()[:10]
    out = _cache_dir() / f"libkvpass_ort_{h}_{_cpu_signature()}{suffix}.so"
    with _lock:
        if out.exists():
            return str(out)
        if shutil.which(compiler) is None:
            raise RuntimeError(f"kvpass: the onnxruntime op library is built on first use and needs a C++17 "
                               f"compiler, but '{compiler}' is not on PATH (install g++ or set CXX)")
        out.parent.mkdir(parents=True, exist_ok=True)
        log.info("kvpass: building the onnxruntime op library %s", out.name)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            res = subprocess.run([compiler, *flags, "-o", tmp, str(_SOURCE)], check=False, capture_output=True,
                                 text=True)
            if res.returncode != 0:
                raise RuntimeError(f"kvpass: building the onnxruntime op library failed:\n{res.stderr[-4000:]}")
            os.replace(tmp, out)  # atomic: a concurrent builder never sees half a library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return str(out)
