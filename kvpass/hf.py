"""Hugging Face glue that kvpass's own jobs use: the cache keyword of this transformers release, greedy
generation with the logits kept."""

from __future__ import annotations

import torch


def cache_kwarg() -> str:
    """The keyword transformers' models take the KV cache by: `cache` (5.2x) or `past_key_values` (5.17)."""
    import inspect

    import transformers as tf

    return "cache" if "cache" in inspect.signature(tf.LlamaForCausalLM.forward).parameters else "past_key_values"


def greedy(model, ids, new_tokens, **gen_kwargs):
    """Greedy ``generate`` of exactly ``new_tokens`` tokens: (sequences [B, T + new], logits [B, new, V]).
    ``ids`` are whole prompts unless an ``attention_mask`` comes with them: given none, ``generate`` would
    infer one from the pad token and hide every prompt token that equals it (id 0 is a real token, "!", in
    Qwen's and Llama's vocabularies)."""
    gen_kwargs.setdefault("attention_mask", torch.ones_like(ids))
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, **gen_kwargs)
    return out.sequences, torch.stack(out.logits, 1)


def crop_to(cache, length: int) -> None:
    """Drop a ``DynamicCache``'s tokens after the first ``length`` (transformers 5: ``crop`` takes minus the
    count to remove)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
