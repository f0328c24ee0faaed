"""The exported SmolLM2 decode step in onnxruntime (``onnx_lsh="custom"``: one ``kvpass.DecodeStep``
node per layer, computed by kvpass's onnxruntime op library, state updated in place through IOBinding)
against the PyTorch kvpass decode step from the same prompt — per layer, ratios from one run.

The PyTorch side is the compiled kvpass path, either way it runs (pairing "eager": the rewritten graph
run eagerly; "inductor": compiled by Inductor).  Estimator "sample" on both sides; timed steps are
greedy decode steps after warm-up (export and compilation excluded).  Per layer = step time / layers.

    pytest benchmarks/test_onnx_step.py --benchmark-only
    pytest benchmarks/test_onnx_step.py --benchmark-only -k "2k and eager"     # quick
"""

from __future__ import annotations

import os

import pytest
import torch
from kvpass.runtime.config import parse_options

import kvpass
from kvpass import export as ex
from kvpass import models
from kvpass.testing import Decoder, reference_prompt

CONTEXTS = {"2k": 2048, "8k": 8192}
STEPS, WARMUP = 12, 3
OPTIONS = {"estimator": "sample", "onnx_lsh": "custom"}


@pytest.fixture(scope="module")
def smollm2():
    """The embedded SmolLM2, or the model `kvpass bench --model NAME` asks for."""
    return models.load_model(os.environ.get("KVPASS_BENCH_MODEL") or models.DEFAULT)


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    model, _ = smollm2
    return ex.export_onnx(model, tmp_path_factory.mktemp("onnx") / "smollm2.onnx", context_len=1024,
                          options=OPTIONS)


def _pytorch_step(model, ids, inductor: bool) -> float:
    fwd = model.forward
    torch._dynamo.reset()
    kvpass.reset()
    try:
        kv_fwd = torch.compile(fwd, backend="kvpass", options={"estimator": "sample", "inductor": inductor})
        Decoder(model, kv_fwd, ids)  # traces (and compiles) the prefill graph
        kvpass.reset()
        return Decoder(model, kv_fwd, ids).median_step(steps=STEPS)
    finally:
        model.forward = fwd
        torch._dynamo.reset()
        kvpass.reset()


@pytest.mark.parametrize("pairing", ["eager", "inductor"])
@pytest.mark.parametrize("context", list(CONTEXTS))
def test_onnx_custom_step(benchmark, smollm2, exported, context, pairing):
    model, tok = smollm2
    n = CONTEXTS[context]
    ids = reference_prompt(tok, n)
    session = kvpass.onnx_session(exported.path, threads=torch.get_num_threads())
    logits, states = ex.prefill_state(model, ids, parse_options(OPTIONS), exported.sites)
    dec = kvpass.OnnxDecoder(session, states, n, spare=WARMUP + STEPS + 8)
    token = [int(logits[0].argmax())]

    def step():
        token[0] = int(dec.step(token[0]).argmax())

    for _ in range(WARMUP):
        step()
    benchmark.group = f"onnx-step-{context}"
    benchmark.pedantic(step, rounds=STEPS, iterations=1, warmup_rounds=0)
    if benchmark.disabled:
        return
    t_onnx = benchmark.stats.stats.median
    t_torch = _pytorch_step(model, ids, inductor=pairing == "inductor")
    layers = exported.layers
    benchmark.extra_info.update({
        "context": n,
        "pairing": pairing,
        "threads": torch.get_num_threads(),
        "ms_per_layer_onnx_custom": round(t_onnx * 1e3 / layers, 3),
        "ms_per_layer_pytorch": round(t_torch * 1e3 / layers, 3),
        "onnx_vs_pytorch": round(t_torch / t_onnx, 3),
    })
    print(f"\n{context} {pairing}: onnxruntime kvpass.DecodeStep {t_onnx * 1e3 / layers:.2f} ms/layer vs PyTorch "
          f"kvpass {t_torch * 1e3 / layers:.2f} ms/layer: {t_torch / t_onnx:.2f}x")
