"""Partial attentions that return (out, lse), and their exact merge.

A partial attention over a key set K returns ``out = softmax(q·K)·V`` and ``lse = log Σ_K exp(q·k)``
(scaled scores).  Two partials over disjoint sets merge exactly into attention over the union:
``out = (e^{lse_a} out_a + e^{lse_b} out_b) / (e^{lse_a} + e^{lse_b})`` — computed in a shifted form so
that neither exponent overflows and an empty set (lse = -inf) contributes nothing.
"""

from __future__ import annotations

import torch


def soft_cap(s: torch.Tensor, softcap: float) -> torch.Tensor:
    """Logit soft-capping of scaled scores (Gemma 2): ``softcap · tanh(s / softcap)``; ``softcap`` <= 0 (or
    None) leaves s as it is.  Applied before the mask, as the models do."""
    return s if not softcap or softcap <= 0 else torch.tanh(s / softcap) * softcap


def softcapped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                         scale: float | None = None, enable_gqa: bool = False, *, softcap: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with logit soft-capping — softmax(cap(q·kᵀ·scale) + mask)·v, the
    softmax in fp32, as Gemma 2's eager attention computes it (same argument names as SDPA, plus
    ``softcap``).  The compile pass puts it where it finds that pattern, so that the site matcher sees one
    node; where the site stays the model's own, this is what runs."""
    if dropout_p:
        raise ValueError("kvpass: softcapped_attention is for inference (dropout_p must be 0)")
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    s = soft_cap(torch.matmul(query, key.transpose(-2, -1)) * scale, softcap)
    if is_causal:
        Tq, L = s.shape[-2], s.shape[-1]
        attn_mask = torch.ones(Tq, L, dtype=torch.bool, device=s.device).tril(L - Tq)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(query.dtype), value)


def softmax_lse(s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-weighted values and the log-sum-exp of scores s [B, Hkv, G, Tq, n] (−inf = not attended)
    over v [B, Hkv, n, D]: (out [B, Hkv, G, Tq, D], lse [B, Hkv, G, Tq]); a row with no key gets out = 0,
    lse = −inf.  Max-shifted, exportable ops only (the exported decode step uses it too)."""
    if s.shape[-1] == 0:
        return s.new_zeros(*s.shape[:-1], v.shape[-1]), s.new_full(s.shape[:-1], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # no key: keep the exponents finite
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    out = (p @ v[:, :, None]) / torch.where(den > 0, den, torch.ones_like(den))
    return out, (m + torch.log(den)).squeeze(-1)


def dense_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, allowed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA-native attention with its log-sum-exp, fp32 accumulation (scores soft-capped by ``softcap`` > 0).

    q: [B, H, Tq, D]; k, v: [B, Hkv, N, D] with H % Hkv == 0 (query head h reads kv head h // (H/Hkv));
    allowed: bool, broadcastable to [B, Hkv, G, Tq, N] or [Tq, N] (False = masked), or None;
    bias: float additive scores, broadcastable to [B, Hkv, G, Tq, N] (see ``mask_bias``), or None.
    Returns out [B, H, Tq, D] float32 and lse [B, H, Tq] float32 (-inf, out = 0 for rows with no key).
    """
    B, H, Tq, D = q.shape
    Hkv = k.shape[1]
    qf = q.float().reshape(B, Hkv, H // Hkv, Tq, D)
    s = soft_cap((qf @ k.float().transpose(-1, -2)[:, :, None]) * scale, softcap)  # [B, Hkv, G, Tq, N]
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    out, lse = softmax_lse(s, v.float())
    return out.reshape(B, H, Tq, D), lse.reshape(B, H, Tq)


def mask_bias(mask: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """A model's attention mask as additive fp32 scores laid out for GQA-native attention.

    mask: bool (True = attend) or float (added to the scores), shaped [Tq, L], [Bm, Tq, L] or
    [Bm, Hm, Tq, L] with Hm 1 or H.  Returns [Bm, Hkv, G, Tq, L] (Hm = H) or [Bm, 1, 1, Tq, L] (Hm = 1).
    """
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.dtype == torch.bool:
        bias = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(~m, float("-inf"))
    else:
        bias = m.float()
    Bm, Hm, Tq, L = bias.shape
    if Hm == 1:
        return bias[:, :, None]
    return bias.reshape(Bm, num_kv_heads, Hm // num_kv_heads, Tq, L)


def static_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the static KV (sinks + window ring), scores soft-capped by ``softcap`` > 0.

    q: [B, H, Tq, D]; k, v: [B, Hkv, S+W, D] (ring slots in any order); k_pos: [S+W] int64 absolute
    position of each slot, -1 for an empty slot; q_pos: [Tq] int64 absolute positions of the queries.
    Without ``bias``, causal by absolute position: query t sees slot j iff 0 <= k_pos[j] <= q_pos[t].
    With ``bias`` (``mask_bias`` of the model's mask, indexed by absolute position: [.., Tq, L]) the
    model's mask decides instead: slot j gets bias[..., k_pos[j]].
    Returns out [B, H, Tq, D] fp32, lse [B, H, Tq] fp32.
    """
    if bias is None:
        allowed = (k_pos >= 0)[None, :] & (k_pos[None, :] <= q_pos[:, None])  # [Tq, S+W]
        return dense_attention_with_lse(q, k, v, scale, allowed, softcap=softcap)
    cols = bias.index_select(-1, k_pos.clamp(min=0))  # [.., Tq, S+W]
    return dense_attention_with_lse(q, k, v, scale, (k_pos >= 0)[None, :], bias=cols, softcap=softcap)


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LSE merge of two partial attentions over disjoint key sets.

    out_*: [..., D] float32; lse_*: [...] float32.  Returns (out [..., D], lse [...]), both float32.
    """
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both empty: keep exponents finite
    wa = torch.exp(lse_a - m)
    wb = torch.exp(lse_b - m)
    denom = wa + wb
    out = (wa.unsqueeze(-1) * out_a + wb.unsqueeze(-1) * out_b) / denom.clamp_min(1e-30).unsqueeze(-1)
    return out, m + torch.log(denom)
