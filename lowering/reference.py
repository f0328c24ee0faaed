"""The plain-torch definitions kvpass is built on, each written once: the estimators, SimHash codes, the
retrieval probability's table, the window ring's slot rule.  The C++ kernels (``cpu_ops``) compute the
same things fast; the exported decode step (``decode_step.py``), the runtime index (``runtime/lsh.py``)
and the tests use these.

Shapes: B batch, H query heads, Hkv kv heads (G = H / Hkv), Tq query tokens, n keys, D head_dim,
K = lsh_k bits per table, L = lsh_l tables.
"""

from __future__ import annotations

import functools
import math
import zlib

import torch
from kvpass.cpu_ops import log_retrieval_probability, sign_codes
from kvpass.lowering.attention import soft_cap, softmax_lse

# The estimators of the offloaded part; the C++ kernel spells the same names (lsh_attention.cpp).
ESTIMATORS = ("sample", "topk", "oracle", "exact", "none")
#   sample  keys colliding in >= threshold of L tables, each weighted by 1 / P(retrieved) (MagicPIG)
#   topk    the `budget` best exact scores among those candidates (retriever "sketch": the `budget`
#           keys whose int4/int8 sketch of k - mu scores best, attended with their exact scores)
#   oracle  the `budget` best exact scores of all offloaded keys (evaluation only)
#   exact   every offloaded key: equals dense attention (validation)
#   none    no offloaded key: the static part alone (StreamingLLM)
# topk and oracle may add a tail sample (``tail_stride`` > 0): every r-th offloaded key the head (the kept
# keys) does not hold, from a random offset, weighted by r — the head counted exactly, the rest estimated
# without bias (``tail_sample``).

LOGP_GRID = 16384  # intervals of the cos θ grid of the log P table (csrc/kvpass_math.h: kTable)


MIN_KEYS = 256  # offloaded tokens before a store's index is built (below: every host key is read exactly)


def ring_slot(position, sink_size: int, window_size: int):
    """The static slot of a token at ``position`` ≥ sink_size: the window is a ring after the sinks.
    Works on ints and on int64 tensors (floor modulo either way)."""
    return sink_size + (position - sink_size) % window_size


# ---------------------------------------------------------------- SimHash

def pack_bits(y: torch.Tensor, lsh_k: int) -> torch.Tensor:
    """int32 [..., L] codes from projections y [..., K·L]: bit j of code l = [y[..., lK + j] > 0].  Written
    with exportable ops only (powers of two, not shifts): the exported decode step hashes with it."""
    weights = torch.pow(2, torch.arange(lsh_k, device=y.device, dtype=torch.int32))
    bits = (y > 0).reshape(*y.shape[:-1], -1, lsh_k).to(torch.int32)
    return (bits * weights).sum(-1).to(torch.int32)


def hash_codes(x: torch.Tensor, proj: torch.Tensor, lsh_k: int) -> torch.Tensor:
    """SimHash of already-centred fp32 x [B, Hkv, n, D] with proj [Hkv, D, K·L] fp32 → int32 [B, Hkv, n, L]."""
    return pack_bits(x @ proj[None], lsh_k)


def simhash(x: torch.Tensor, mu: torch.Tensor, proj: torch.Tensor, lsh_k: int, chunk: int = 4096) -> torch.Tensor:
    """Codes of x − μ: x [B, Hkv, n, D] (any float dtype, any device) → int32 [B, Hkv, n, L] on x's device.

    mu: [B, Hkv, D] fp32; proj: [Hkv, D, K·L] (bf16 values, computed in fp32).  In token chunks (a GEMM
    each).  On the CPU the bits are packed by the C++ ``sign_codes`` (one pass; the torch packing's
    temporaries cost more than the GEMM there); elsewhere by ``pack_bits`` — the same codes."""
    B, Hkv, n, _ = x.shape
    proj = proj.to(x.device, torch.float32)
    pack = sign_codes if x.device.type == "cpu" else pack_bits
    out = [pack((x[:, :, t0:t0 + chunk].float() - mu.to(x.device)[:, :, None]) @ proj[None], lsh_k)
           for t0 in range(0, n, chunk)]
    return torch.cat(out, 2) if out else torch.empty(B, Hkv, 0, proj.shape[-1] // lsh_k, dtype=torch.int32,
                                                    device=x.device)


# ---------------------------------------------------------------- the key sketch (the "sketch" retriever)

SKETCH_BITS = (8, 4)  # code widths the sketch supports


def sketch_levels(bits: int) -> int:
    """The codes of a ``bits``-bit sketch lie in [-levels, levels]: 127 for int8, 7 for int4."""
    return (1 << (bits - 1)) - 1


def sketch_scale(keys: torch.Tensor, mu: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-dimension step of the key sketch, frozen with μ when the index is built: max |k − μ| over the
    build keys / levels (``sketch_levels``; 1 where a dimension is constant).  keys [B, Hkv, n, D]; mu
    [B, Hkv, D] → fp32."""
    amax = (keys.float() - mu[:, :, None]).abs().amax(2)
    return torch.where(amax > 0, amax / sketch_levels(bits), torch.ones_like(amax))


def sketch_codes(k: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """int8 [B, Hkv, n, D]: round((k − μ) / scale), clamped to ±levels (a later key beyond the build keys'
    range saturates).  The sketch score of key j for query q is Σ_d q_d · scale_d · code_jd, q·(k − μ) up
    to the rounding — the same ranking as q·k, since q·μ is one constant per query."""
    x = (k.float() - mu[:, :, None].to(k.device)) / scale[:, :, None].to(k.device)
    lv = sketch_levels(bits)
    return x.round().clamp(-lv, lv).to(torch.int8)


def sketch_project(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q' = q · scale per dimension (fp32): q [B, Hkv, G, Tq, D], scale [B, Hkv, D] → same shape as q.  The
    store hands the kernel these rows; the reference computes them here, so both quantise the same floats."""
    return q.float() * scale[:, :, None, None]


def sketch_query(qs: torch.Tensor) -> torch.Tensor:
    """The scaled query rows (``sketch_project``) rounded to ±127 levels of their own max |q'_d| (one step
    per row; a zero row stays 0) → integer-valued fp32, same shape.  The kernel computes the same integers
    (one fp32 division per row, the same products, rounded half to even)."""
    m = qs.abs().amax(-1, keepdim=True)
    inv = torch.where(m > 0, torch.full_like(m, sketch_levels(8)) / m, torch.zeros_like(m))  # one fp32 division
    return (qs * inv).round()


def sketch_rows(q: torch.Tensor, scale: torch.Tensor, unit: torch.Tensor | None = None,
                rot: torch.Tensor | None = None) -> torch.Tensor:
    """The query rows a sketch is scored against, before ``sketch_query`` rounds them (the store hands the
    kernel these): q · scale (``sketch_project``), or for the rotated sketch (unit, rot given) the query in
    the code's coordinates first (``rotated_query``).  q [B, Hkv, G, Tq, D] → same shape, fp32."""
    return sketch_project(q if rot is None else rotated_query(q, unit, rot), scale)


def sketch_scores(q: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, unit: torch.Tensor | None = None,
                  rot: torch.Tensor | None = None) -> torch.Tensor:
    """Integer sketch scores Σ_d round(q'_d) · code_jd (``sketch_query`` of ``sketch_rows``), exact in fp32
    (|score| ≤ 127² · D < 2^24 for D ≤ 512), the ranking of q·(k − μ) up to both roundings: q [B, Hkv, G, Tq,
    D] fp32, codes [B, Hkv, n, D] int8 (any width), scale [B, Hkv, D]; unit, rot: the rotated sketch's
    (``rotated_sketch_codes``) → [B, Hkv, G, Tq, n]."""
    return sketch_query(sketch_rows(q, scale, unit, rot)) @ codes.float().transpose(-1, -2)[:, :, None]


def best_of(scores: torch.Tensor, m: int, among: torch.Tensor | None = None) -> torch.Tensor:
    """bool, scores' shape: the m best scores along the last dimension (equal scores by key order), only
    ``among`` those marked when given."""
    if among is not None:
        scores = scores.masked_fill(~among, float("-inf"))
    top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :m]
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    return keep if among is None else keep & among


def sketch_candidates(q: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, m: int) -> torch.Tensor:
    """bool [B, Hkv, G, Tq, n]: the m keys of best sketch score, equal scores by key order (the kernel's
    rule).  Shapes as ``sketch_scores``."""
    return best_of(sketch_scores(q, codes, scale), m)


# ---------------------------------------------------------------- the rotated code (issue 36: a study so far)
# A key's centred coordinates, each measured in a unit of its own dimension (``rotated_unit``: the standard
# deviation over the build keys, or the query-aware unit), turned by one seeded random rotation, then coded
# in b bits each with a step of the key's own (a mid-rise uniform quantiser): a quantised random
# projection, the p-stable LSH family (at b = 1, SimHash / RaBitQ's code).  Code c in [0, 2^b) stands for
# (c + 1/2 - 2^(b-1)) steps; its high h bits alone, for the middle of their interval: the same code at h
# bits and 2^(b-h) times the step — what a scan of the high bit planes sees.

# The step that minimises a unit Gaussian's mean squared error for a uniform mid-rise quantiser of 2^b
# levels (Max 1960; the rotated, whitened coordinates are close to Gaussian): step = this x the key's RMS.
GAUSS_STEP = {1: 1.5958, 2: 0.9957, 3: 0.5860, 4: 0.3352, 5: 0.1881, 6: 0.1041, 7: 0.0569, 8: 0.0308}


def rotation(dim: int, seed: int) -> torch.Tensor:
    """A seeded random rotation [D, D] (fp32, orthogonal: Q of the QR of a Gaussian matrix, signs fixed so
    that it is uniform over the orthogonal group)."""
    g = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    qm, r = torch.linalg.qr(g)
    return (qm * torch.sign(torch.diagonal(r))).float()


def rotated_std(keys: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Per-dimension standard deviation of the centred build keys [B, Hkv, n, D] → [B, Hkv, D] fp32 (1
    where a dimension is constant), frozen with μ."""
    sd = (keys.float() - mu[:, :, None]).pow(2).mean(2).sqrt()
    return torch.where(sd > 0, sd, torch.ones_like(sd))


def rotated_unit(std: torch.Tensor, q_sq: torch.Tensor | None = None) -> torch.Tensor:
    """The unit each centred key dimension is measured in before the rotation, [B, Hkv, D] fp32.

    Without query statistics: the keys' standard deviation (``rotated_std``: whitening).  With q_sq, the
    mean q_d² of the queries that will read the code ([B, Hkv, D], e.g. the prefill's queries of the kv
    head's group): u_d = sqrt(std_d / rms(q_d)).  Why: the rotation spreads the quantiser's error evenly over
    the coordinates, with a step ∝ RMS((k − μ) / u), so a score's error has variance ∝ Σ_d q_d² u_d² ·
    Σ_d std_d² / u_d², which (Cauchy–Schwarz) is smallest, (Σ_d rms(q_d) · std_d)², at this u.  Whitening
    is that optimum only where rms(q_d) ∝ 1 / std_d.  A dimension no query reads (rms 0) is taken at 10⁻⁶ of
    the kv head's largest rms."""
    if q_sq is None:
        return std
    rms = q_sq.float().sqrt()
    floor = rms.amax(-1, keepdim=True) * 1e-6
    rms = torch.where(floor > 0, rms.maximum(floor), torch.ones_like(rms))  # no query at all: whitening's shape
    return (std / rms).sqrt()


def rotated_coords(k: torch.Tensor, mu: torch.Tensor, unit: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """The code's coordinates of keys k [B, Hkv, n, D]: x = ((k − μ) / unit) · rot (``rotated_unit``), fp32,
    computed in fp64 (a key's coordinates are the same floats whichever keys it is computed with: the
    matrix product's summation order may depend on the rows, and fp64 hides that below fp32's rounding)."""
    return (((k.double() - mu[:, :, None].double()) / unit[:, :, None].double()) @ rot.double()).float()


def rotated_codes(k: torch.Tensor, mu: torch.Tensor, unit: torch.Tensor, rot: torch.Tensor,
                  bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [B, Hkv, n, D] in [0, 2^bits), step [B, Hkv, n] fp32) of keys k [B, Hkv, n, D]: the
    coordinates x (``rotated_coords``) coded with the key's step = GAUSS_STEP[bits] · RMS(x)."""
    x = rotated_coords(k, mu, unit, rot)
    rms = x.pow(2).mean(-1).sqrt()
    step = torch.where(rms > 0, rms * GAUSS_STEP[bits], torch.ones_like(rms))
    half = 1 << (bits - 1)
    codes = (x / step[..., None]).floor().add(half).clamp(0, 2 * half - 1)
    return codes.to(torch.uint8), step


def rotated_query(q: torch.Tensor, unit: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """The query in the code's coordinates: (q · unit) · rot, so that q·(k − μ) = q̃ · x.  q [B, Hkv, G, Tq,
    D] → same shape, fp32 (computed in fp64, as ``rotated_coords``)."""
    return ((q.double() * unit[:, :, None, None].double()) @ rot.double()).float()


# The rotated sketch (retriever "rotated"): the rotated coordinates x in the query-aware unit, coded in int4
# with ONE step per kv head, the same codes and scan as the key sketch (``sketch_tiles``, the kernel's
# int4 scan): a mid-rise code in [-8, 7] (value code + 1/2 steps: the 1/2 adds Σ q'_d, one constant per
# query row, and ranks alike).  One step per kv head, not per key: on Qwen2.5-Coder-0.5B at 16k it finds
# 0.976 of the exact top 1% among the best 1.5% against a step per key's 0.978 (the sketch's: 0.936), and
# needs no per-key multiply in the scan (docs/quality.md).  The step, ROTATED_STEP x the RMS of the build
# keys' coordinates (0.37 measured best of 0.30-0.45), is frozen with μ.
ROTATED_STEP = 0.37


def site_seed(seed: int, site: str) -> int:
    """The generator seed of one attention site's random matrices (the SimHash projection, the rotated
    sketch's rotation): from the options' seed and the site's name, the same in every process."""
    return (seed * 1_000_003 + zlib.crc32(site.encode())) % (2**63)


@functools.lru_cache(maxsize=64)
def site_rotation(seed: int, site: str, dim: int) -> torch.Tensor:
    """The rotated sketch's rotation of one site, [D, D] fp32: ``rotation`` seeded by ``site_seed``, shared by
    its kv heads and every sequence through it (as the SimHash projection)."""
    return rotation(dim, site_seed(seed, site))


def rotated_sketch_scale(keys: torch.Tensor, mu: torch.Tensor, unit: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """The rotated sketch's step, ROTATED_STEP x the RMS of the build keys' coordinates per kv head (1 where
    they are all 0), as a per-dimension scale [B, Hkv, D] fp32 (what ``sketch_rows`` multiplies by)."""
    rms = rotated_coords(keys, mu, unit, rot).pow(2).mean((2, 3)).sqrt()
    step = torch.where(rms > 0, rms * ROTATED_STEP, torch.ones_like(rms))
    return step[..., None].expand(*step.shape, keys.shape[-1]).contiguous()


def rotated_sketch_codes(k: torch.Tensor, mu: torch.Tensor, unit: torch.Tensor, rot: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor:
    """int8 [B, Hkv, n, D] in [-8, 7]: floor(x / step) of the coordinates (``rotated_coords``), clamped (a key
    beyond the build keys' range saturates)."""
    return (rotated_coords(k, mu, unit, rot) / scale[:, :, None]).floor().clamp(-8, 7).to(torch.int8)


def _planes_value(u: torch.Tensor, bits: int, planes: int) -> torch.Tensor:
    """Unsigned ``bits``-bit codes u known by their ``planes`` high bits: the middle of each code's
    interval, fp32 (u itself when every plane is read)."""
    low = bits - planes
    return (u >> low).float() * (1 << low) + ((1 << low) - 1) / 2


def rotated_scores(qt: torch.Tensor, codes: torch.Tensor, step: torch.Tensor, bits: int,
                   planes: int | None = None) -> torch.Tensor:
    """The estimate of q·(k − μ) from the codes' ``planes`` high bits (all when None): q̃ [B, Hkv, G, Tq, D]
    (``rotated_query``), codes / step of ``rotated_codes`` → [B, Hkv, G, Tq, n] fp32."""
    value = _planes_value(codes.to(torch.int32), bits, bits if planes is None else planes) \
        + 0.5 - (1 << (bits - 1))  # in steps
    return (qt @ value.transpose(-1, -2)[:, :, None]) * step[:, :, None, None]


def sketch_plane_scores(q: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, planes: int) -> torch.Tensor:
    """The int4 sketch read from its ``planes`` high bit planes: the nibble code + 8 (as the kernel stores
    it) known to its high bits, each dimension taken at the middle of its interval; scored against
    q' = q · scale (``sketch_project``).  q [B, Hkv, G, Tq, D], codes int8 [B, Hkv, n, D] in ±7, scale
    [B, Hkv, D] → [B, Hkv, G, Tq, n] fp32."""
    value = _planes_value(codes.to(torch.int32) + 8, 4, planes) - 8
    return sketch_project(q, scale) @ value.transpose(-1, -2)[:, :, None]


def staged_candidates(coarse: torch.Tensor, full: torch.Tensor, first: int, m: int) -> torch.Tensor:
    """bool [B, Hkv, G, Tq, n]: stage 1 keeps the ``first`` keys of best ``coarse`` score (a code's high bit
    planes: ``rotated_scores(..., planes)``, ``sketch_plane_scores``); stage 2 re-ranks those by the
    ``full`` score (the whole code) and keeps m."""
    return best_of(full, m, among=best_of(coarse, first))


def lsh_candidates(q_codes: torch.Tensor, k_codes: torch.Tensor, threshold: int) -> torch.Tensor:
    """bool [B, Hkv, G, Tq, n]: the keys colliding with the query in ≥ threshold tables.  q_codes
    [B, Hkv, G, Tq, L]; k_codes [B, Hkv, n, L]."""
    return (q_codes[..., None, :] == k_codes[:, :, None, None]).to(torch.int32).sum(-1) >= threshold


# ---------------------------------------------------------------- the retrieval probability

@functools.lru_cache(maxsize=16)
def logp_table(lsh_k: int, lsh_l: int, threshold: int) -> torch.Tensor:
    """log P(retrieved | cos θ) at cos θ = −1 + 2i/LOGP_GRID, i = 0..LOGP_GRID, fp32 — the kernels' table.
    P = P[≥ threshold of lsh_l tables collide], one table colliding with (1 − θ/π)^lsh_k."""
    grid = -1.0 + 2.0 * torch.arange(LOGP_GRID + 1, dtype=torch.float64) / LOGP_GRID
    return log_retrieval_probability(grid, lsh_k, lsh_l, threshold).float()


def lookup_logp(cos: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Linear interpolation in the log P table (cos θ clamped to [−1, 1]), as the kernels do it."""
    x = (cos.clamp(-1.0, 1.0) + 1.0) * 0.5 * LOGP_GRID
    i = x.floor().clamp(max=LOGP_GRID - 1)
    f = x - i
    i = i.to(torch.int64)
    lo, hi = table[i], table[i + 1]
    return lo + f * (hi - lo)


def centred_cos(qk: torch.Tensor, q: torch.Tensor, k: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """cos θ between q and k − μ from q·k: (q·k − q·μ) / (|q| |k − μ|), |k − μ|² expanded as the kernels
    do (k·k − 2 k·μ + μ·μ), 0 where either vector is 0.  qk [.., G, Tq, n]; q [.., G, Tq, D];
    k [.., n, D]; mu [.., D] (leading dims B, Hkv)."""
    mu_ = mu[:, :, None, None].float()  # [B, Hkv, 1, 1, D]
    qmu = (q * mu_).sum(-1, keepdim=True)
    kk = (k * k).sum(-1)[:, :, None, None]
    kmu = (k * mu[:, :, None].float()).sum(-1)[:, :, None, None]
    mumu = (mu_ * mu_).sum(-1, keepdim=True)
    denom = q.norm(dim=-1, keepdim=True) * torch.sqrt((kk - 2 * kmu + mumu).clamp_min(0.0))
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, (qk - qmu) / safe, torch.zeros_like(qk))


# ---------------------------------------------------------------- the tail sample

def stride_offsets(seed: int, site: str, position: int, batch: int, kv_heads: int, stride: int) -> torch.Tensor:
    """int64 [batch, kv_heads] in [0, stride): where each (batch row, kv head)'s tail sample starts at the
    decode step whose newest token is at ``position``.  Drawn from (seed, site, position): a fresh sample each
    step and site, and the same one when a step is computed again (a beam reorder, a cropped draft).  One
    draw serves every batch row and kv head of the site (each head's estimate is unbiased either way, as each
    shares the site's SimHash projection): a head samples alike whichever heads share its site — under
    tensor parallelism a rank holds a slice of them, and its results do not depend on the rank count."""
    key = (seed * 1_000_003 + zlib.crc32(site.encode()) * 65_537 + position) % (2**63)
    draw = torch.randint(stride, (1, 1), generator=torch.Generator().manual_seed(key))
    return draw.expand(batch, kv_heads).contiguous()


def tail_sample(n: int, stride: int, offset: torch.Tensor) -> torch.Tensor:
    """bool [B, Hkv, 1, 1, n]: the keys j = offset + i·stride of n offloaded keys; offset [B, Hkv].  Each key
    is in it with probability 1/stride over the offset, so weighting the sampled keys by stride estimates
    the sum over all keys without bias (a systematic sample)."""
    return (torch.arange(n) % stride == offset[:, :, None, None, None].to(torch.int64))


# ---------------------------------------------------------------- the estimators

def estimator_scores(q: torch.Tensor, k: torch.Tensor, scale: float, estimator: str, *,
                     q_codes: torch.Tensor | None = None, k_codes: torch.Tensor | None = None,
                     mu: torch.Tensor | None = None, logp: torch.Tensor | None = None, threshold: int = 2,
                     budget: int | None = None, sketch: tuple[torch.Tensor, ...] | None = None,
                     softcap: float = 0.0, qk: torch.Tensor | None = None, stride: int = 0,
                     offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores each estimator gives the offloaded keys: −inf where a key is not attended, and for
    "sample" the importance weight folded in (s − log P(retrieved)); s soft-capped by ``softcap`` > 0 (a
    monotone map: retrieval and the top-k's choice do not change).  topk/oracle with ``stride`` > 0: the
    kept keys are the head, and the ``tail_sample`` keys outside it are attended too, weighted by stride
    (s + log stride); offset [B, Hkv] (``stride_offsets``).

    q [B, Hkv, G, Tq, D] fp32; k [B, Hkv, n, D] fp32; q_codes [B, Hkv, G, Tq, L]; k_codes [B, Hkv, n, L];
    mu [B, Hkv, D]; logp: ``logp_table(K, L, threshold)``.  ``sketch`` = (codes, scale) of the keys
    (``sketch_codes``), or (codes, scale, unit, rot) (``rotated_sketch_codes``): "topk" then keeps the `budget` keys of best sketch score instead of the best
    of the LSH collisions.  Returns (s [B, Hkv, G, Tq, n] fp32, candidates [B, Hkv, G, Tq] int: keys
    retrieved, or all n; with a tail sample, its keys too).  qk: q·kᵀ [B, Hkv, G, Tq, n] when the caller has
    it already."""
    qk = q @ k.transpose(-1, -2)[:, :, None] if qk is None else qk
    s = soft_cap(qk * scale, softcap)
    n = k.shape[2]
    if stride and estimator not in ("topk", "oracle"):
        raise ValueError(f"kvpass: the tail sample goes with estimator 'topk' or 'oracle', not {estimator!r}")
    if estimator == "topk" and sketch is not None:
        keep = best_of(sketch_scores(q, *sketch), n if budget is None else min(n, max(budget, 1)))
        candidates = keep.sum(-1)
    else:
        s, keep, candidates = _retrieved(s, qk, q, k, estimator, q_codes, k_codes, mu, logp, threshold, budget)
    if stride:
        tail = tail_sample(n, stride, offset) & ~keep
        s = torch.where(tail, s + math.log(stride), s)
        keep, candidates = keep | tail, candidates + tail.sum(-1)
    return s.masked_fill(~keep, float("-inf")), candidates


def _retrieved(s, qk, q, k, estimator, q_codes, k_codes, mu, logp, threshold, budget):
    """estimator_scores without the sketch or a tail: (s, the keys kept, the candidates' count)."""
    if estimator in ("sample", "topk"):
        keep = lsh_candidates(q_codes, k_codes, threshold)
    elif estimator in ("oracle", "exact"):
        keep = torch.ones_like(s, dtype=torch.bool)
    else:
        raise ValueError(f"kvpass: estimator {estimator!r} attends no offloaded key (one of {list(ESTIMATORS)})")
    candidates = keep.sum(-1)
    if estimator == "sample":
        s = s - lookup_logp(centred_cos(qk, q, k, mu), logp)
    elif estimator in ("topk", "oracle") and budget is not None and budget < k.shape[2]:
        top = s.masked_fill(~keep, float("-inf")).topk(max(budget, 0), dim=-1).indices
        keep = keep & torch.zeros_like(keep).scatter_(-1, top, True)
    return s, keep, candidates


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, estimator: str, *,
                        q_codes: torch.Tensor | None = None, k_codes: torch.Tensor | None = None,
                        mu: torch.Tensor | None = None, lsh_k: int = 10, lsh_l: int = 150, threshold: int = 2,
                        budget: int | None = None, sketch: tuple[torch.Tensor, ...] | None = None,
                        softcap: float = 0.0, stride: int = 0,
                        offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An estimator over offloaded keys in plain torch (dense cost, the kernel's result).

    q [B, H, Tq, D]; k, v [B, Hkv, n, D]; q_codes [B, H, Tq, L]; k_codes [B, Hkv, n, L]; mu [B, Hkv, D];
    sketch: (codes, scale) for the sketch retriever, (codes, scale, unit, rot) for the rotated one
    (``sketch_scores``); stride, offset: the tail sample (``estimator_scores``).
    Returns out [B, H, Tq, D] fp32, lse [B, H, Tq] fp32, n_read [B, H, Tq] int32 (keys scored)."""
    B, H, Tq, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    qg = q.float().reshape(B, Hkv, G, Tq, D)
    qc = q_codes.reshape(B, Hkv, G, Tq, -1) if q_codes is not None else None
    s, n_read = estimator_scores(qg, k.float(), scale, estimator, q_codes=qc, k_codes=k_codes, mu=mu,
                                 logp=logp_table(lsh_k, lsh_l, threshold) if estimator == "sample" else None,
                                 threshold=threshold, budget=budget, sketch=sketch, softcap=softcap,
                                 stride=stride, offset=offset)
    out, lse = softmax_lse(s, v.float())
    return out.reshape(B, H, Tq, D), lse.reshape(B, H, Tq), n_read.reshape(B, H, Tq).int()
