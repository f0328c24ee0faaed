"""ONNX export of the kvpass decode step: the explicit-state op against the runtime store, exported
random-weight models (two families) in onnxruntime against the compiled PyTorch kvpass path."""

import math

import numpy as np
import onnx
import pytest
import torch
from kvpass.lowering.decode_step import decode_step_reference
from kvpass.lowering.reference import logp_table
from kvpass.runtime import REGISTRY

import kvpass
from kvpass import export as ex
from kvpass.testing import cache_kwarg, compile_kvpass, greedy, tiny_model

CONTEXT = 1100  # ≥ 1,024 tokens of context


@pytest.mark.parametrize("estimator", ["exact", "none", "sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [3, 18, 272, 700])
def test_decode_step_op_is_the_store_step(estimator, dtype, T):
    """Steps of the explicit-state op = KVStore.append + KVStore.attend (the C++ kernel), and its new state
    = the store's state after the append, in every phase: a prompt shorter than the ring (3: sinks still
    filling; 18: the window), below min_keys host tokens, the step that builds the index (272 + 4 steps:
    256 offloaded), and an index built by the prompt (700).  Placeholder rows the short phase appends
    precede the real host rows."""
    torch.manual_seed(0)
    B, H, Hkv, D, S, W = 2, 8, 2, 32, 4, 16
    store = kvpass.KVStore(Hkv, D, sink_size=S, window_size=W, dtype=dtype, site="t", estimator="sample")
    store.append(torch.randn(B, Hkv, T, D) + 0.5, torch.randn(B, Hkv, T, D))
    state = ex.store_state(store)
    built = []
    for p in range(T, T + 6):
        q, k, v = torch.randn(B, H, 1, D) * 2, torch.randn(B, Hkv, 1, D) + 0.5, torch.randn(B, Hkv, 1, D)
        out, *new = decode_step_reference(q, k, v, *state.values(), store.index.proj("cpu").float(),
                                          logp_table(10, 150, 2), torch.tensor(p), S, W, 10, 2, estimator,
                                          1 / math.sqrt(D))
        store.append(k, v)
        ref = store.attend(q, estimator=estimator)
        assert (out - ref).abs().max() <= 1e-5
        after = ex.store_state(store)
        state = dict(zip(ex.UPDATED, new))
        for name, t in state.items():
            n = after[name].shape[2] if name in ("host_k", "host_v", "codes") else None
            assert torch.equal(t[:, :, t.shape[2] - n:] if n is not None else t, after[name]), (p, name)
        built.append(store.index.built)
    assert built == ([False] * 6 if T < 272 else [False] * 3 + [True] * 3 if T == 272 else [True] * 6)
    if estimator == "sample" and T == 700:
        assert 0 < store.last_keys_read < T - S - W  # it sampled, it did not read everything


def _prompt(n=CONTEXT):
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(family, estimator) → ExportInfo, exported once per module."""
    cache = {}

    def get(family, estimator, onnx_lsh="portable"):
        key = family, estimator, onnx_lsh
        if key not in cache:
            path = tmp_path_factory.mktemp("onnx") / f"{family}_{estimator}_{onnx_lsh}.onnx"
            cache[key] = ex.export_onnx(tiny_model(family), path, context_len=CONTEXT,
                                        options={"estimator": estimator, "onnx_lsh": onnx_lsh})
        return cache[key]

    return get


@pytest.mark.parametrize("onnx_lsh", ["portable", "custom"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("estimator", ["exact", "none", "sample"])
def test_onnxruntime_step_matches_pytorch_kvpass(exported, family, estimator, onnx_lsh):
    from transformers import DynamicCache

    info = exported(family, estimator, onnx_lsh)
    assert info.layers == 2 and info.sites == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    onnx.checker.check_model(str(info.path))
    nodes = [n for n in onnx.load(str(info.path), load_external_data=False).graph.node if n.domain == "kvpass"]
    assert len(nodes) == (2 if onnx_lsh == "custom" else 0)  # portable: standard ops only
    session = kvpass.onnx_session(info.path)
    model = compile_kvpass(tiny_model(family), estimator=estimator)
    ids = _prompt()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        nxt = model(input_ids=ids, use_cache=True, **{cache_kwarg(): cache}).logits[:, -1].argmax(-1, keepdim=True)
        stores = {s.site: s for s in REGISTRY.stores()}
        state = [ex.store_state(stores[s]) for s in info.sites]  # the compiled path's own state
        ref = model(input_ids=nxt, use_cache=True, **{cache_kwarg(): cache}).logits[:, -1]
    spare = 3 if onnx_lsh == "custom" else 0  # capacity layout: free host rows after the used ones
    fed = ex.with_capacity(state, spare) if spare else state
    feed = dict(zip(info.input_names, [t.numpy() for t in ex.flat_inputs(nxt, CONTEXT, fed)]))
    logits, *new = session.run(None, feed)
    assert np.abs(logits[:, -1] - ref.numpy()).max() <= 1e-3
    assert np.abs(ref.numpy()).max() > 0.1  # not a vacuous comparison
    for i, site in enumerate(info.sites):  # the state after the step, as onnxruntime carries it on
        after = ex.store_state(stores[site])
        for j, name in enumerate(ex.UPDATED):
            got = torch.from_numpy(new[i * len(ex.UPDATED) + j])
            if spare and name in ("host_k", "host_v", "codes"):
                n = after[name].shape[2]
                assert got.shape[2] == n - 1 + spare, name
                assert torch.equal(got[:, :, n:], torch.zeros_like(got[:, :, n:])), name  # capacity untouched
                got = got[:, :, :n]
            assert got.shape == after[name].shape, name
            assert (got.float() - after[name].float()).abs().max() <= 1e-4, (site, name)


@pytest.mark.parametrize("onnx_lsh", ["portable", "custom"])
@pytest.mark.parametrize("family,prompt", [("llama", CONTEXT), ("qwen2", CONTEXT), ("llama", 20), ("qwen2", 300)])
def test_greedy_tokens_through_onnxruntime(exported, family, prompt, onnx_lsh):
    """The tokens of PyTorch kvpass, from a long prompt, a chat-length one (20 tokens: the ring is still
    filling for the 32 steps) and one whose decode builds the index (300: 232 offloaded, 256 reached at
    the 24th step)."""
    info = exported(family, "sample", onnx_lsh)
    session = kvpass.onnx_session(info.path)
    ids = _prompt(prompt)

    class Tok:  # token ids in, ids out: the driver needs only decode (and an eos id)
        eos_token_id = None

        @staticmethod
        def decode(tokens):
            return " ".join(map(str, tokens))

    tokens, _ = ex.onnx_generate(session, Tok, ids, model=tiny_model(family), max_new_tokens=32)
    model = compile_kvpass(tiny_model(family), estimator="sample")
    with torch.no_grad():
        seq, _ = greedy(model, ids, 32)
    assert len(tokens) == 32
    assert tokens == seq[0, ids.shape[1]:].tolist()
    assert len(set(tokens)) > 1


def test_export_refuses_what_it_cannot_reproduce(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ex.ExportError, match=r"estimator 'topk' cannot be exported yet.*'preset': 'magicpig'"):
        ex.export_program(model, context_len=CONTEXT)  # the defaults (topk over the key sketch)
    sample = {"estimator": "sample"}
    with pytest.raises(ex.ExportError, match="context_len must be >= "):
        ex.export_program(model, context_len=200, options=sample)
    with pytest.raises(ex.ExportError, match="int16"):
        ex.export_program(model, context_len=CONTEXT, options={**sample, "onnx_lsh": "custom", "lsh_k": 16})
    with pytest.raises(ex.ExportError, match="float32"):
        ex.export_program(tiny_model("llama").to(torch.bfloat16), context_len=CONTEXT,
                          options={**sample, "onnx_lsh": "custom"})
    with pytest.raises(ValueError, match="onnx_lsh"):
        ex.export_program(model, context_len=CONTEXT, options={"onnx_lsh": "fast"})
    with pytest.raises(ex.ExportError, match="sliding-window"):
        ex.export_program(tiny_model("mistral", sliding_window=128), context_len=CONTEXT, options=sample)
    store = kvpass.KVStore(2, 16, sink_size=4, window_size=64, estimator="sample")
    store.append(torch.randn(1, 2, 200, 16), torch.randn(1, 2, 200, 16))
    store.crop(150)
    with pytest.raises(ex.ExportError, match="cropped"):
        ex.store_state(store)
    for retriever in ("sketch", "rotated"):  # the defaults: the key sketch; the rotated sketch
        store = kvpass.KVStore(2, 16, sink_size=4, window_size=64, retriever=retriever)
        store.append(torch.randn(1, 2, 500, 16), torch.randn(1, 2, 500, 16))
        with pytest.raises(ex.ExportError, match=f"key sketch \\(retriever '{retriever}'"):
            ex.store_state(store)
