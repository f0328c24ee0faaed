"""How the rewritten ops become code: the static-KV attention (torch reference here; Triton on GPU is
its own kernel) and the exact log-sum-exp merge of two partial attentions."""

from kvpass.lowering.attention import dense_attention_with_lse, mask_bias, merge_partials, static_attention

__all__ = ["dense_attention_with_lse", "mask_bias", "merge_partials", "static_attention"]
