"""Quantized weights for decoding on a CPU, with torch's own packed matmuls (no extra package).

A CPU user runs a model with quantized weights (llama.cpp's GGUF files are 4-bit); in fp32 the model's
projections and MLP, not attention, take most of a long-context kvpass step.  ``quantize_weights`` swaps
every ``nn.Linear`` of a model (the LM head included) for one that multiplies by a packed copy of its
weight, in place, before ``torch.compile(..., backend="kvpass")``: the pass sees the same attention
sites, and Inductor compiles the packed matmuls as the aten ops they are.

    fp32   the model unchanged
    bf16   the whole model in bfloat16 (``model.to(torch.bfloat16)``)
    int8   each output channel's weights w ≈ scale · c, c = round(w / scale) in [-127, 127], scale =
           max |w| / 127 (bf16): ``aten._weight_int8pack_mm``
    int4   each output channel's weights in groups of ``group`` inputs (128, or 64 / 32 where the input
           size needs it), w ≈ (c − 8) · scale + zero, c in [0, 15], scale = (max − min) / 15, zero = min
           + 8 · scale (bf16): ``aten._weight_int4pack_mm_for_cpu``

Activations go into the packed matmuls in bfloat16 and come back in the model's dtype.  What each packed
layer multiplies by, as a dense fp32 matrix, is ``PackedLinear.dequantized()`` (the tests' reference; int4:
the kernel's products with unit inputs, rounded to bf16 as its outputs are).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("kvpass")

WEIGHTS = ("fp32", "bf16", "int8", "int4")
INT4_GROUPS = (128, 64, 32)  # the first that divides a layer's input size


class PackedLinear(nn.Module):
    """A linear layer y = x Wᵀ + b whose W is packed for one of torch's CPU matmuls (subclasses)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # x [M, K] bf16 -> [M, N] bf16
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:  # [N, K] fp32
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, self.in_features).to(torch.bfloat16))
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(PackedLinear):
    """int8 weights, one bf16 scale per output channel (``aten._weight_int8pack_mm``)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        w = linear.weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny).to(torch.bfloat16)
        self.register_buffer("codes", (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale)

    def matmul(self, x):
        return torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scales)

    def dequantized(self):
        return self.codes.float() * self.scales.float()[:, None]


class Int4Linear(PackedLinear):
    """int4 weights per group of ``group`` inputs, a bf16 scale and zero each (``aten._weight_int4pack_mm_for_cpu``)."""

    def __init__(self, linear: nn.Linear, group: int):
        super().__init__(linear)
        w = linear.weight.detach().float()
        N, K = w.shape
        g = w.reshape(N, K // group, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        codes = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(N, K)
        self.group = group
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        # [K / group, N, 2]: the kernel's layout of (scale, zero) per group and output channel
        sz = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.register_buffer("scales_and_zeros", sz)

    def matmul(self, x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_and_zeros)

    def dequantized(self):  # the packed kernel's own product with each unit input (its bf16 output rounding)
        return self.matmul(torch.eye(self.in_features, dtype=torch.bfloat16)).float().T.contiguous()


def check_weights(weights: str) -> None:
    """A ValueError naming the choices unless ``weights`` is one of ``WEIGHTS``."""
    if weights not in WEIGHTS:
        raise ValueError(f"kvpass: weights must be one of {list(WEIGHTS)}, got {weights!r}")


def int4_group(in_features: int, out_features: int) -> int | None:
    """The int4 group size of a layer (the first of ``INT4_GROUPS`` that divides its inputs), or None where
    torch's int4 packing cannot take it: no group divides the inputs, or the outputs are not a multiple of 16."""
    if out_features % 16:
        return None
    return next((g for g in INT4_GROUPS if in_features % g == 0), None)


def quantize_weights(model: nn.Module, weights: str) -> nn.Module:
    """``model`` (on the CPU) with its weights as ``weights`` says (one of ``WEIGHTS``; module doc), in place;
    returns it.  int8 / int4 replace every ``nn.Linear``; a layer int4 cannot pack (an input size no group
    of ``INT4_GROUPS`` divides, outputs not a multiple of 16) stays as it is, said in the log."""
    check_weights(weights)
    if weights == "fp32":
        return model
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"kvpass: weights={weights!r} packs the weights for torch's CPU matmuls; the model is on "
                         f"{sorted(devices - {'cpu'})}")
    if weights == "bf16":
        return model.to(torch.bfloat16)
    kept = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if weights == "int8":
                setattr(parent, name, Int8Linear(child))
            elif (group := int4_group(child.in_features, child.out_features)) is not None:
                setattr(parent, name, Int4Linear(child, group))
            else:
                kept.append(f"{name} ({child.in_features} -> {child.out_features})")
    if kept:
        log.warning("kvpass: %d linear layers stay unquantized: torch's int4 packing needs inputs in groups of "
                    "%s and outputs a multiple of 16 (%s)", len(kept), "/".join(map(str, INT4_GROUPS)),
                    ", ".join(kept[:4]))
    return model
