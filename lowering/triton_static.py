"""Triton kernel for the static part of a decode step: attention of a small query block over the ring
buffer of sinks + window, GQA-native, returning (out, lse) — and a variant that also merges the CPU's
partial (o_d, lse_d) by log-sum-exp, so the device does one pass.

One program per (batch row, kv head): its G query heads × Tq tokens (≤ 64 rows) share every K/V tile,
which is read once.  Tiles of BLOCK_N slots; online softmax in fp32; fp16/bf16/fp32 inputs; any
head_dim (padded to a power of two inside the kernel).  On a CPU machine the kernel runs under
``TRITON_INTERPRET=1`` (tests); ``static_attention_triton`` is the launcher, the torch reference is
``kvpass.lowering.static_attention``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(device: torch.device) -> bool:
    """Whether the kernel can run on tensors of ``device``: a CUDA device (compiled), or any device's
    tensors on the CPU under TRITON_INTERPRET=1 (tests)."""
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


@triton.jit
def _static_attention_kernel(
    Q, K, V, KPOS, QPOS, OUT, LSE, OD, LSED,
    sqb, sqh, sqt, skb, skh, skn, svb, svh, svn, sob, soh, sot, sdb, sdh, sdt,
    H, HKV, TQ, N, scale, softcap,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    FUSE_MERGE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // HKV
    hk = pid % HKV
    G = H // HKV
    rows = tl.arange(0, BLOCK_R)                   # row r = (query head hk*G + r // TQ, token r % TQ)
    h = hk * G + rows // TQ
    t = rows % TQ
    row_ok = rows < G * TQ
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(Q + b * sqb + h[:, None] * sqh + t[:, None] * sqt + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    q_pos = tl.load(QPOS + t, mask=row_ok, other=0)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < N
        k_pos = tl.load(KPOS + n, mask=n_ok, other=-1)
        k = tl.load(K + b * skb + hk * skh + n[:, None] * skn + d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(V + b * svb + hk * svh + n[:, None] * svn + d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale        # [BLOCK_R, BLOCK_N]
        if SOFTCAP:  # c · tanh(s / c), tanh(x) = 2 σ(2x) − 1 (lowering.attention.soft_cap)
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
        allowed = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None]) & row_ok[:, None]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)           # no key yet: keep exponents finite
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    has = l > 0
    lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
    out = tl.where(has[:, None], acc / tl.where(has, l, 1.0)[:, None], 0.0)
    if FUSE_MERGE:  # exact LSE merge with the CPU partial over the offloaded keys
        o_d = tl.load(OD + b * sdb + h[:, None] * sdh + t[:, None] * sdt + d[None, :],
                      mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse_d = tl.load(LSED + (b * H + h) * TQ + t, mask=row_ok, other=float("-inf"))
        mm = tl.maximum(lse, lse_d)
        mm = tl.where(mm == float("-inf"), 0.0, mm)
        wa = tl.exp(lse - mm)
        wb = tl.exp(lse_d - mm)
        den = wa + wb
        out = (wa[:, None] * out + wb[:, None] * o_d) / tl.maximum(den, 1e-30)[:, None]
        lse = tl.where(den > 0, mm + tl.log(tl.where(den > 0, den, 1.0)), float("-inf"))
    tl.store(OUT + b * sob + h[:, None] * soh + t[:, None] * sot + d[None, :], out,
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b * H + h) * TQ + t, lse, mask=row_ok)


def _block_n(rows: int, block_d: int) -> int:
    """Slots per tile where nothing is tuned (the CPU interpreter, ``tune=False``): the [rows, BLOCK_N,
    BLOCK_D] products stay within ~16K fp32 elements per program (register budget); a power of two in
    [16, 64]."""
    bn = 64
    while bn > 16 and rows * bn * block_d > 16384:
        bn //= 2
    return bn


# On CUDA the tile is autotuned from a small list (per kv-slot count, head_dim, rows per program and
# variant; the dtype is part of Triton's key).  The autotuner times candidates with CUDA events, so the
# interpreter uses the heuristic above; tests drive the tuned launcher with a stand-in timer.
TUNE_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w) for bn in (16, 32, 64) for w in (2, 4)]


def _prune(configs, named_args, **kwargs):
    """Drop tiles whose [rows, BLOCK_N, BLOCK_D] products exceed ~32K fp32 elements (they spill)."""
    rows, block_d = kwargs["BLOCK_R"], kwargs["BLOCK_D"]
    kept = [c for c in configs if rows * c.kwargs["BLOCK_N"] * block_d <= 32768]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.num_warps))]


@functools.cache
def make_tuned(do_bench=None):
    """The autotuned launcher of the kernel (``do_bench``: Triton's timer unless given); one per timer,
    so its tuning results are kept across calls."""
    extra = {"do_bench": do_bench} if do_bench is not None else {}
    return triton.autotune(configs=TUNE_CONFIGS, key=["N", "D", "BLOCK_R", "FUSE_MERGE", "SOFTCAP"],
                           prune_configs_by={"early_config_prune": _prune}, **extra)(_static_attention_kernel)


def static_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor,
                            q_pos: torch.Tensor, scale: float, out_d: torch.Tensor | None = None,
                            lse_d: torch.Tensor | None = None, *, softcap: float = 0.0, tune: bool | None = None,
                            _tuned=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``kvpass.lowering.static_attention`` (same arguments and results); with
    ``out_d`` [B, H, Tq, D] fp32 and ``lse_d`` [B, H, Tq] fp32 given, returns the merge of both parts.

    q: [B, H, Tq, D] (Tq <= 8); k, v: [B, Hkv, N, D], head_dim contiguous; k_pos: [N] int64 (-1 =
    empty slot); q_pos: [Tq] int64.  Returns out [B, H, Tq, D] fp32, lse [B, H, Tq] fp32.
    tune: autotune the tile from TUNE_CONFIGS (default: on CUDA); ``_tuned`` (tests) a launcher from
    ``make_tuned``.  softcap > 0: scores soft-capped, softcap · tanh(s / softcap)."""
    B, H, Tq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if H % Hkv or k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError("kvpass: static_attention_triton needs H % Hkv == 0 and a contiguous head_dim")
    q = q.contiguous()
    out = torch.empty(B, H, Tq, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    fuse = out_d is not None
    od = out_d.contiguous() if fuse else out
    ld = lse_d.contiguous() if fuse else lse
    rows = (H // Hkv) * Tq
    block_r = max(2, triton.next_power_of_2(rows))
    block_d = max(16, triton.next_power_of_2(D))
    args = (q, k, v, k_pos.contiguous(), q_pos.contiguous(), out, lse, od, ld,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            od.stride(0), od.stride(1), od.stride(2),
            H, Hkv, Tq, N, float(scale), float(softcap or 0.0))
    cap = bool(softcap) and softcap > 0
    if tune is None:
        tune = q.device.type == "cuda"
    if tune:
        (_tuned or make_tuned())[(B * Hkv,)](*args, D=D, BLOCK_D=block_d, BLOCK_R=block_r, FUSE_MERGE=fuse,
                                            SOFTCAP=cap)
    else:
        _static_attention_kernel[(B * Hkv,)](*args, D=D, BLOCK_D=block_d, BLOCK_R=block_r,
                                             BLOCK_N=_block_n(block_r, block_d), FUSE_MERGE=fuse, SOFTCAP=cap)
    return out, lse
