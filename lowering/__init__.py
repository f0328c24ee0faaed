"""Pure maths and code generation: partial attentions with their LSE and the exact merge, the plain-torch
definitions of the estimators and of SimHash (``reference``), the Triton static-KV kernel, and the
explicit-state decode step that the ONNX export carries."""

from kvpass.lowering.attention import (
    dense_attention_with_lse,
    mask_bias,
    merge_partials,
    soft_cap,
    softmax_lse,
    static_attention,
)

__all__ = ["dense_attention_with_lse", "mask_bias", "merge_partials", "soft_cap", "softmax_lse", "static_attention"]
