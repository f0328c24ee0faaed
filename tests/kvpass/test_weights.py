"""Quantized weights (``kvpass.weights``): torch's packed int8 / int4 CPU matmuls in place of every linear
layer, composed with the kvpass backend."""

import logging

import pytest
import torch
from torch import nn

import kvpass
from kvpass.hf import greedy
from kvpass.testing import compile_kvpass, tiny_model
from kvpass.weights import INT4_GROUPS, Int4Linear, Int8Linear, PackedLinear, int4_group, quantize_weights


@pytest.mark.parametrize("kind,bias", [("int8", False), ("int8", True), ("int4", False), ("int4", True)])
def test_a_packed_layer_multiplies_by_its_dequantized_weight(kind, bias):
    """y = x Wqᵀ + b with Wq what the layer packed (``dequantized``), for inputs of any leading shape; Wq is
    W to the code's step: int8 within half a step of its channel's scale, int4 within half a group's step."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=bias)
    q = Int8Linear(lin) if kind == "int8" else Int4Linear(lin, 128)
    w = lin.weight.detach()
    wq = q.dequantized()
    if kind == "int8":
        step = q.scales.float()[:, None]
        assert ((wq - w).abs() <= step * 0.5 + 1e-3 * step).all()
    else:
        g = w.reshape(96, 2, 128)
        step = ((g.amax(-1) - g.amin(-1)) / 15)[..., None].expand(-1, -1, 128).reshape(96, 256)
        assert ((wq - w).abs() <= step * 0.51 + 0.01 * w.abs()).all()  # + the bf16 scale's and output's rounding
    x = torch.randn(2, 3, 256)
    want = x.bfloat16().float() @ wq.T + (lin.bias.detach() if bias else 0)
    torch.testing.assert_close(q(x), want, rtol=2e-2, atol=2e-2)  # bf16 products, bf16 output
    assert q(x).dtype == torch.float32 and q(x).shape == (2, 3, 96)


def test_int4_groups_follow_the_layer_and_a_layer_torch_cannot_pack_is_kept(caplog):
    assert [int4_group(k, 16) for k in (896, 4864, 64, 96, 100)] == [128, 128, 64, 32, None]
    assert int4_group(128, 100) is None and INT4_GROUPS[0] == 128
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 96), nn.Linear(96, 100), nn.Linear(100, 16))
    with caplog.at_level(logging.WARNING, logger="kvpass"):
        quantize_weights(model, "int4")
    assert isinstance(model[0], Int4Linear) and model[0].group == 128
    assert isinstance(model[2], Int4Linear) and model[2].group == 64
    assert type(model[3]) is nn.Linear and type(model[4]) is nn.Linear
    assert "2 linear layers stay unquantized" in caplog.text and "96 -> 100" in caplog.text


def test_weights_are_checked_before_anything_happens():
    with pytest.raises(ValueError, match="weights must be one of"):
        quantize_weights(nn.Linear(4, 4), "int3")
    with pytest.raises(ValueError, match="weights must be one of"):
        kvpass.load_model("no-such-model", weights="fp8")


@pytest.mark.parametrize("weights", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("inductor", [False, True])
def test_exact_mode_on_quantized_weights_is_the_quantized_dense_model(weights, inductor):
    """The pass finds every site of a quantized model, and exact mode decodes the quantized dense model's
    tokens (Inductor compiles the packed matmuls too)."""
    model = quantize_weights(tiny_model("llama"), weights)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == (0 if weights == "bf16" else 2 * 7 + 1)  # q k v o gate up down per layer, lm_head
    ids = torch.randint(1, 256, (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, want_logits = greedy(model, ids, 16)
    compile_kvpass(model, window_size=16, sink_size=4, estimator="exact", inductor=inductor)
    kvpass.reset()
    with torch.no_grad():
        got, logits = greedy(model, ids, 16)
    assert torch.equal(got, want)
    # bf16 activations: Inductor rounds them where its fusions put the casts (0.002 seen at int8), eager
    # exactly as the dense model does
    assert (logits.float() - want_logits.float()).abs().max() <= (5e-2 if weights == "bf16" or inductor else 1e-3)
    assert kvpass.runtime_stats()["tokens_offloaded"] > 0
