"""Partial attentions and the exact LSE merge (DESIGN.md invariant 4)."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kvpass.lowering import dense_attention_with_lse, merge_partials, static_attention


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.sampled_from([1, 2, 3]), G=st.sampled_from([1, 2, 4]), Tq=st.integers(1, 4),
       N=st.integers(1, 70), D=st.sampled_from([8, 16, 64]), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_split_anywhere_and_merge_equals_union(B, Hkv, G, Tq, N, D, seed, data):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, Tq, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g) * 2
    v = torch.randn(B, Hkv, N, D, generator=g)
    in_a = torch.tensor(data.draw(st.lists(st.booleans(), min_size=N, max_size=N)))  # arbitrary split, may be empty
    scale = D ** -0.5
    out_a, lse_a = dense_attention_with_lse(q, k[:, :, in_a], v[:, :, in_a], scale)
    out_b, lse_b = dense_attention_with_lse(q, k[:, :, ~in_a], v[:, :, ~in_a], scale)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    ref = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    ref_lse = torch.logsumexp((q.view(B, Hkv, G, Tq, D) @ k.unsqueeze(2).transpose(-1, -2)) * scale, -1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse.reshape(B, Hkv * G, Tq), atol=1e-5, rtol=1e-5)


def test_merge_with_two_empty_sets_is_zero_not_nan():
    out = torch.zeros(1, 2, 1, 4)
    lse = torch.full((1, 2, 1), float("-inf"))
    o, l = merge_partials(out, lse, out, lse)
    assert torch.all(o == 0) and torch.all(torch.isneginf(l))


def test_static_attention_is_causal_by_position_over_a_wrapped_ring():
    torch.manual_seed(0)
    S, W, D = 2, 4, 8
    k, v = torch.randn(1, 1, S + W, D), torch.randn(1, 1, S + W, D)
    # sinks hold positions 0, 1; the ring has wrapped: slots hold positions 12, 9, 10, 11
    k_pos = torch.tensor([0, 1, 12, 9, 10, 11])
    q = torch.randn(1, 2, 2, D)
    q_pos = torch.tensor([11, 12])
    out, _ = static_attention(q, k, v, k_pos, q_pos, D ** -0.5)
    order = torch.tensor([0, 1, 3, 4, 5, 2])  # slots in position order 0,1,9,10,11,12
    allowed = torch.tensor([[True] * 5 + [False], [True] * 6])
    ref = F.scaled_dot_product_attention(q, k[:, :, order], v[:, :, order], attn_mask=allowed, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
