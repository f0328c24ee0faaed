"""Saved contexts: prefill once, save, load (in memory or memory-mapped) in a fresh registry, decode the
same tokens; anything damaged or mismatched is refused before it is used."""

import copy
import json

import pytest
import torch

import kvpass
from kvpass.runtime import REGISTRY
from kvpass.testing import compile_kvpass, tiny_model

from .test_fork import PREFIX, QUESTIONS, _ask, _prefill

OPTIONS = {"window_size": 16, "sink_size": 4, "host_block_size": 128}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A prefilled context saved to disk, the questions' answers from the live cache, and the store states."""
    model = compile_kvpass(tiny_model("llama"), **OPTIONS)
    kvpass.reset()
    prefix = _prefill(model, PREFIX)
    path = kvpass.save_context(prefix, tmp_path_factory.mktemp("ctx") / "doc", model)
    states = [REGISTRY.by_handle(layer.keys).state() for layer in prefix.layers]
    answers = [_ask(model, copy.deepcopy(prefix), q) for q in QUESTIONS]
    return model, path, states, answers


@pytest.mark.parametrize("mmap", [False, True], ids=["memory", "mmap"])
def test_a_loaded_context_is_the_saved_state_and_decodes_the_same_tokens(saved, mmap):
    model, path, states, answers = saved
    kvpass.reset()
    cache = kvpass.load_context(path, model, options=OPTIONS, mmap=mmap)
    assert cache.get_seq_length() == PREFIX.shape[1]
    for layer, (meta, tensors) in zip(cache.layers, states):
        meta2, tensors2 = REGISTRY.by_handle(layer.keys).state()
        assert meta2 == meta and tensors2.keys() == tensors.keys()
        assert all(torch.equal(tensors2[k], t) for k, t in tensors.items())  # bit-identical
    assert [_ask(model, copy.deepcopy(cache), q).tolist() for q in QUESTIONS] == [a.tolist() for a in answers]
    assert torch.equal(_ask(model, cache, QUESTIONS[0]), answers[0])  # the loaded cache itself, too


def _damaged(path, tmp_path, how):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = bad / "context.safetensors"
    data = bytearray(tensors.read_bytes())
    if how == "truncated":
        tensors.write_bytes(data[:len(data) // 2])
    elif how == "flipped byte":
        data[len(data) - 1000] ^= 0x10
        tensors.write_bytes(data)
    elif how == "header":
        (bad / "context.json").write_text((bad / "context.json").read_text()[:-20])
    elif how == "other release":
        header = json.loads((bad / "context.json").read_text())
        header["kvpass"] = "0.0.1"
        (bad / "context.json").write_text(json.dumps(header))
    return bad


@pytest.mark.parametrize("how,match", [("truncated", "damaged"), ("flipped byte", "damaged"),
                                       ("header", "not a readable kvpass context"), ("other release", "saved by kvpass 0.0.1")])
def test_a_damaged_context_is_refused_and_nothing_is_loaded(saved, tmp_path, how, match):
    model, path, _, _ = saved
    kvpass.reset()
    with pytest.raises(kvpass.ContextError, match=match):
        kvpass.load_context(_damaged(path, tmp_path, how), model, options=OPTIONS)
    assert not REGISTRY.stores()


def test_a_damaged_file_is_refused_unverified_too_where_its_structure_shows_it(saved, tmp_path):
    model, path, _, _ = saved
    with pytest.raises(kvpass.ContextError, match="cannot be read as safetensors"):
        kvpass.load_context(_damaged(path, tmp_path, "truncated"), model, options=OPTIONS, verify=False)


def test_another_model_or_other_options_are_refused(saved):
    model, path, _, _ = saved
    other = tiny_model("llama")
    with torch.no_grad():
        other.model.norm.weight.add_(0.01)  # the same config, other weights
    kvpass.reset()
    with pytest.raises(kvpass.ContextError, match="another model"):
        kvpass.load_context(path, other, options=OPTIONS)
    with pytest.raises(kvpass.ContextError, match="other kvpass options"):
        kvpass.load_context(path, model, options={**OPTIONS, "window_size": 32})
    assert not REGISTRY.stores()


def test_saving_replaces_a_context_atomically(saved, tmp_path):
    model, path, _, _ = saved
    kvpass.reset()
    cache = kvpass.load_context(path, model)
    target = tmp_path / "ctx"
    kvpass.save_context(cache, target, model)
    first = (target / "context.json").read_text()
    kvpass.save_context(cache, target, model)  # over the old one
    assert (target / "context.json").read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx"]  # no temporary folder left behind


def test_a_chunked_prefill_hands_kvpass_the_whole_prompt_at_once():
    """``kvpass.context.prefill``: chunks through the model's own forward, then kvpass takes the KV over in
    one append — exact mode answers as dense, and the index is built over every prompt key at once."""
    from kvpass.context import prefill

    model = tiny_model("llama")
    dense = [_ask(model, copy.deepcopy(_prefill(model, PREFIX)), q) for q in QUESTIONS]
    compile_kvpass(model, **OPTIONS, estimator="exact")
    kvpass.reset()
    cache = prefill(model, PREFIX, chunk=96, progress=False)
    assert cache.get_seq_length() == PREFIX.shape[1]
    assert [_ask(model, copy.deepcopy(cache), q).tolist() for q in QUESTIONS] == [a.tolist() for a in dense]
    store = REGISTRY.by_handle(cache.layers[0].keys)
    host = torch.cat(store.host.views()[0], 2)
    assert host.shape[2] == store.index.n_keys == PREFIX.shape[1] - 4 - 16
    # μ is the mean of the 379 keys the first append offloaded (the prompt but its last token), not of a chunk's
    torch.testing.assert_close(store.index.mu, host[:, :, :-1].float().mean(2))


def test_kvpass_ask_prefills_once_saves_and_answers_from_the_loaded_context(tmp_path, capsys):
    """The job end to end on a small random model in a local folder (SmolLM2's tokenizer): prefill, save,
    three answers; then the same from the saved context."""
    from kvpass import cli
    from kvpass.models import load_default_model

    _, tok = load_default_model()
    folder = tmp_path / "model"
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    common = ["ask", "--model", str(folder), "--context", "700", "--new-tokens", "6", "--no-inductor",
              "--window-size", "16"]
    assert cli.main([*common, "--save-context", str(tmp_path / "ctx")]) == 0
    first = capsys.readouterr().out
    assert cli.main([*common, "--load-context", str(tmp_path / "ctx"), "--mmap"]) == 0
    second = capsys.readouterr().out

    def answers(out):
        return [block.split("\n")[1] for block in out.split("=== question ")[1:]]

    assert len(answers(first)) == 3 and answers(first) == answers(second)
    assert "prefilled" in first and "prefilling the document again for each question" in first
    assert "loaded (memory-mapped)" in second
