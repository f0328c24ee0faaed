"""Builds and loads the ``kvpass_cpu`` C++ ops (``torch.utils.cpp_extension``), once per process, and gives
each its fake (meta) kernel for Dynamo / AOT / export.

``KVPASS_SANITIZE=1`` builds (and loads) the ops — and the onnxruntime op library — with AddressSanitizer +
UndefinedBehaviorSanitizer, under their own cache names; the process must then be started with the
sanitizer runtime preloaded (``scripts/sanitize.sh`` does that and runs the kernel fuzz tests).
"""

from __future__ import annotations

import contextlib
import fcntl
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
_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast"]
_SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]


def sanitize() -> bool:
    """Whether the C++ libraries are built with ASan + UBSan (``KVPASS_SANITIZE=1``)."""
    return os.environ.get("KVPASS_SANITIZE", "") not in ("", "0")


def build_flags() -> tuple[list[str], list[str], str]:
    """(compile flags, link flags, cache-name suffix) of both C++ libraries."""
    if sanitize():
        return _FLAGS + _SANITIZE, ["-fopenmp", "-fsanitize=address,undefined"], "_asan"
    return list(_FLAGS), ["-fopenmp"], ""


def _cpu_signature() -> str:
    """Hash of the CPU's feature flags.  The kernels pick their SIMD level at run time, but the build
    cache stays per CPU kind anyway: a cache shared between machines (an NFS home, a container image)
    then never depends on that dispatch being right."""
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
    for src in [*_SOURCES, *sorted(_CSRC.glob("*.h"))]:  # the headers they include change the build too
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
        cflags, ldflags, suffix = build_flags()
        name = f"kvpass_cpu_{_source_signature()}_{_cpu_signature()}{suffix}"
        # where cpp_extension.load would build ($TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/pyXY_cpu)
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        log.info("kvpass: loading CPU kernels (%s); the first build takes ~15 s", name)
        try:
            with build_lock(build_dir):
                cpp_extension.load(
                    name=name,
                    sources=[str(s) for s in _SOURCES],
                    extra_cflags=cflags,
                    extra_ldflags=ldflags,
                    build_directory=str(build_dir),
                    is_python_module=False,
                    verbose=False,
                )
        except Exception as e:  # a compiler error is long; keep it, and say what failed first
            raise RuntimeError(f"kvpass: building the CPU kernel {name} failed ({type(e).__name__}). "
                               f"Details:\n{e}") from e
        _register_fakes()
        _loaded = True


@contextlib.contextmanager
def build_lock(build_dir: Path):
    """Hold an OS lock on ``build_dir`` for one build, across processes.

    ``cpp_extension.load`` guards a build with a plain ``lock`` file and waits *forever* while it exists,
    so a build that was killed (Ctrl-C, a CI timeout) leaves every later process hanging.  An ``flock`` is
    released by the kernel when its holder dies: every kvpass build takes it first, so a ``lock`` file
    found while holding it was left by a dead builder and is removed (with a warning)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "kvpass.flock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                log.warning("kvpass: removing %s, left by a build that was killed", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _id_bytes(n: int) -> int:
    """Bytes of a segment's bit-packed ids for n tokens (csrc/lsh_index.h: packed_bytes(n, id_width(n)))."""
    return (n * max(1, (n - 1).bit_length()) + 7) // 8 + 4


def _register_fakes() -> None:
    """Fake (meta) kernels of the C++ ops: shapes and dtypes only, as their docstrings below state."""
    fake = torch.library.register_fake

    @fake("kvpass_cpu::lsh_build_segment")
    def _(codes, lsh_k):
        B, Hkv, n, L = codes.shape
        return (codes.new_empty(B, Hkv, L, _id_bytes(int(n)), dtype=torch.uint8),
                codes.new_empty(B, Hkv, L, 1 << lsh_k, dtype=torch.int16))

    @fake("kvpass_cpu::lsh_merge_segments")
    def _(ids_a, starts_a, n_a, ids_b, starts_b, n_b):
        return ids_a.new_empty(*starts_a.shape[:3], _id_bytes(n_a + n_b)), torch.empty_like(starts_a)

    @fake("kvpass_cpu::lsh_attention")
    def _(q, proj, mu, k_blocks, v_blocks, block_size, n_keys, seg_ids, seg_starts, seg_meta, tail_codes,
          tail_base, tail_len, lsh_k, threshold, estimator, budget, scale, static_k=None, static_v=None,
          static_allowed=None, sketch_blocks=None, sketch_query=None, sketch_bits=8, threads=0, row_lo=None, row_budget=None,
          softcap=0.0, stride=0, stride_offset=None, block_starts=None, sketch_starts=None):
        B, H, Tq, _ = q.shape
        return (torch.empty_like(q), q.new_empty(B, H, Tq), q.new_empty(B, H, Tq, dtype=torch.int32),
                q.new_empty(B, H, Tq, dtype=torch.int32), q.new_empty(B, H, Tq, proj.shape[2] // lsh_k, dtype=torch.int32),
                q.new_empty(B, mu.shape[1], 3, dtype=torch.int64))

    @fake("kvpass_cpu::log_retrieval_probability")
    def _(cos_theta, lsh_k, lsh_l, threshold):
        return torch.empty_like(cos_theta, dtype=torch.float64)

    @fake("kvpass_cpu::sign_codes")
    def _(y, lsh_k):
        return y.new_empty(*y.shape[:-1], y.shape[-1] // lsh_k, dtype=torch.int32)


def lsh_build_segment(codes: torch.Tensor, lsh_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket tables of one index segment.  codes: [B, Hkv, n, L] int (n <= 32768, values < 2**lsh_k).

    Returns (ids uint8 [B, Hkv, L, nbytes]: segment-local token ids in bucket order, bit-packed at
    bit_length(n - 1) bits + 4 bytes of padding; starts int16 [B, Hkv, L, 2**lsh_k]: first slot of
    each bucket, as uint16)."""
    load()
    return torch.ops.kvpass_cpu.lsh_build_segment(codes, lsh_k)


def lsh_merge_segments(ids_a: torch.Tensor, starts_a: torch.Tensor, n_a: int, ids_b: torch.Tensor,
                       starts_b: torch.Tensor, n_b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two adjacent segments (n_a then n_b tokens, n_a + n_b <= 32768) as one, same layout as
    lsh_build_segment's: per bucket A's ids then B's, re-packed at the wider width."""
    load()
    return torch.ops.kvpass_cpu.lsh_merge_segments(ids_a, starts_a, n_a, ids_b, starts_b, n_b)


def lsh_attention(q: torch.Tensor, proj: torch.Tensor, mu: torch.Tensor, k_blocks: list[torch.Tensor],
                  v_blocks: list[torch.Tensor], block_size: int, n_keys: int, seg_ids: list[torch.Tensor],
                  seg_starts: list[torch.Tensor], seg_meta: torch.Tensor, tail_codes: torch.Tensor,
                  tail_base: int, tail_len: int, *, lsh_k: int, threshold: int, estimator: str, budget: int,
                  scale: float, static_k: torch.Tensor | None = None, static_v: torch.Tensor | None = None,
                  static_allowed: torch.Tensor | None = None, sketch_blocks: list[torch.Tensor] | None = None,
                  sketch_query: torch.Tensor | None = None, sketch_bits: int = 8, threads: int = 0,
                  row_lo: torch.Tensor | None = None, row_budget: torch.Tensor | None = None,
                  softcap: float = 0.0, stride: int = 0, stride_offset: torch.Tensor | None = None,
                  block_starts: torch.Tensor | None = None, sketch_starts: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused hash → retrieve → score → softmax → V over the host keys for one query block
    (see lsh_attention.cpp).

    q: [B, H, Tq, D] fp32; proj: [Hkv, D, K·L] bf16 (the SimHash projection); mu: [B, Hkv, D] fp32 (the
    index's centre); host keys in blocks of ``block_size`` tokens; seg_meta: int64 [num_segments, 2] =
    (base, n); tail_codes: int16 [B, Hkv, L, cap], the codes of keys [tail_base, tail_base + tail_len).
    Optionally the static keys static_k/static_v [B, Hkv, NS, D] (KV dtype) with static_allowed
    [Tq, NS] bool — or [B, Tq, NS], per batch row — are attended exactly in the same pass (then out/lse cover
    both parts).  ``row_lo`` int64 [B]: row b's host keys start at row_lo[b] (the ones before are left
    padding: never attended, never counted in n_read); ``row_budget`` int64 [B]: row b's budget instead of
    ``budget`` (a padded batch: each row's share of its own keys); ``softcap`` > 0: every score s = q·k·scale
    is soft-capped to softcap · tanh(s / softcap) before the softmax (Gemma 2's logit capping).  With
    ``sketch_blocks`` (int8 [B, Hkv, block_size / 16, words, 16, 4] per host block: ``sketch_codes`` of
    the keys as ``runtime.lsh.sketch_tiles`` lays them out, ``sketch_bits`` wide) and ``sketch_query``
    [B, H, Tq, D] fp32 (``sketch_project`` of q), "topk" keeps the ``budget`` keys of best sketch score instead of the
    best LSH candidates (no query codes then: they stay 0).  ``threads``: the OpenMP team (0: OpenMP's
    default, i.e. torch's setting).  ``stride`` > 0 (topk/oracle): the kept keys are the head of the estimate
    and every ``stride``-th other host key, from ``stride_offset`` int64 [B, Hkv] (in [0, stride)), is added
    with weight ``stride`` — the tail sample (``reference.estimator_scores``).  ``block_starts`` int64
    [n_blocks]: the first key of each host block, rising from 0 in multiples of ``block_size`` (then the
    page size, not the blocks' size: a forked store shares its parent's blocks and starts its own on a page);
    block i holds keys [start_i, start_i+1) from its token 0.  Absent: block i starts at i · block_size.
    ``sketch_starts``: the same for the sketch blocks, in multiples of 64 keys.
    Returns out [B, H, Tq, D] fp32, lse [B, H, Tq] fp32, n_read [B, H, Tq] int32 (host keys scored), n_kept
    [B, H, Tq] int32 (of them, in the estimate), the query codes [B, H, Tq, L] int32 it used, and what it
    read, int64 [B, Hkv, 3] per kv head: the sketch's bytes scanned (every pass), the distinct host keys
    whose K row and whose V row it read (a key that several query rows read counted once)."""
    load()
    return torch.ops.kvpass_cpu.lsh_attention(q, proj, mu, k_blocks, v_blocks, block_size, n_keys, seg_ids,
                                              seg_starts, seg_meta, tail_codes, tail_base, tail_len, lsh_k,
                                              threshold, estimator, budget, scale, static_k,
                                              static_v, static_allowed, sketch_blocks, sketch_query,
                                              sketch_bits, threads, row_lo, row_budget, float(softcap),
                                              int(stride), stride_offset, block_starts, sketch_starts)


def log_retrieval_probability(cos_theta: torch.Tensor, lsh_k: int, lsh_l: int, threshold: int) -> torch.Tensor:
    """log P[key retrieved] as the kernel defines it (float64, exact, no table): collide in >= threshold of
    lsh_l tables, each with p = (1 - θ/π)**lsh_k; clamped at -69, never NaN."""
    load()
    return torch.ops.kvpass_cpu.log_retrieval_probability(cos_theta, lsh_k, lsh_l, threshold)


def sign_codes(y: torch.Tensor, lsh_k: int) -> torch.Tensor:
    """SimHash codes from CPU projections y [..., K·L] fp32: int32 [..., L], bit j of code l = [y[lK + j] > 0]
    (the same bits as ``runtime.lsh.hash_codes``'s torch packing, in one pass)."""
    load()
    return torch.ops.kvpass_cpu.sign_codes(y, lsh_k)


def simd_level() -> str:
    """The SIMD level the kernels dispatch to on this CPU: "avx512", "avx2" or "scalar"."""
    load()
    return ("scalar", "avx2", "avx512")[torch.ops.kvpass_cpu.simd_level()]
