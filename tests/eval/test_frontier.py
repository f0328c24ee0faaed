"""The frontier's fast teacher-forced measurement equals decoding through the compiled model, and its
key counts follow the configuration."""

import pytest
import torch

import kvpass
from kvpass.eval import frontier as fr
from kvpass.hf import cache_kwarg
from kvpass.testing import tiny_model

PREFIX, TOKENS = 420, 10


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")  # GQA: 4 q / 2 kv heads
    ids = torch.randint(3, model.config.vocab_size, (1, PREFIX + TOKENS + 1), generator=torch.Generator().manual_seed(1))
    return model, ids, fr.dense_prefix(model, ids, PREFIX)


def compiled_decode(model, ids, options):
    """Ground truth: prefill ids[:PREFIX] through torch.compile(backend="kvpass"), then feed the next
    TOKENS tokens one decode step at a time; log-probs of each step."""
    from transformers import DynamicCache

    fwd = model.forward
    torch._dynamo.reset()
    kvpass.reset()
    model.forward = torch.compile(fwd, backend="kvpass", options={**options, "inductor": False})
    try:
        cache = DynamicCache(config=model.config)
        rows = []
        with torch.no_grad():
            model(input_ids=ids[:, :PREFIX], use_cache=True, **{cache_kwarg(): cache})
            for t in range(PREFIX, PREFIX + TOKENS):
                out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{cache_kwarg(): cache})
                rows.append(out.logits[0, -1].float().log_softmax(-1))
    finally:
        model.forward = fwd
        torch._dynamo.reset()
        kvpass.reset()
    return torch.stack(rows)


@pytest.mark.parametrize("options", [
    {"estimator": "sample", "window_size": 16, "lsh_k": 4, "lsh_l": 20},
    {"estimator": "topk", "window_size": 16, "lsh_k": 4, "lsh_l": 20, "budget": 24},
    {"estimator": "topk", "retriever": "rotated", "window_size": 16, "budget": 24},
    {"estimator": "none", "window_size": 16},
    {"estimator": "exact", "window_size": 8, "dense_layers": [1]},
], ids=lambda o: o.get("retriever", o["estimator"]))
def test_teacher_forced_block_equals_compiled_decode(setup, options):
    model, ids, cache = setup
    want = compiled_decode(model, ids, options)
    got, dec = fr.teacher_forced(model, ids, PREFIX, TOKENS, options, cache)
    assert cache.get_seq_length() == PREFIX  # left as it was
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert list(dec.attended) == [f"model.layers.{i}.self_attn" for i in range(model.config.num_hidden_layers)]


def test_points_count_keys_as_documented(setup):
    model, ids, cache = setup
    configs = {"dense": None, "exact": {"estimator": "exact", "window_size": 16},
               "static": {"estimator": "none", "window_size": 16},
               "oracle": {"estimator": "oracle", "window_size": 16, "budget": 40, "tail_stride": 0},
               "oracle + tail": {"estimator": "oracle", "window_size": 16, "budget": 40, "tail_stride": 10},
               "topk": {"estimator": "topk", "window_size": 16, "budget": 40, "lsh_k": 3, "lsh_l": 16, "tail_stride": 0},
               "half-dense": {"estimator": "none", "window_size": 16, "dense_layers": [0]}}
    pts = {p.config: p for p in fr.frontier(model, ids, configs, prefix=PREFIX, tokens=TOKENS, cache=cache)}
    assert pts["dense"].kl == 0.0 and pts["dense"].attended == 1.0
    assert pts["exact"].kl < 1e-6 and pts["exact"].attended == pytest.approx(1.0)
    assert pts["exact"].top1 == 1.0
    # static-only attends the 4 sinks + 16 window tokens of ~PREFIX context tokens; scores no host key
    ctx = torch.arange(PREFIX + 1, PREFIX + TOKENS + 1, dtype=torch.float32)
    assert pts["static"].attended == pytest.approx(float((20 / ctx).mean()), rel=1e-5)
    assert pts["static"].scored == pytest.approx(pts["static"].attended) and pts["static"].kl > 100 * max(pts["exact"].kl, 1e-9)
    # the oracle keeps exactly its budget but scores every key
    assert pts["oracle"].attended == pytest.approx(float(((20 + 40) / ctx).mean()), rel=1e-5)
    assert pts["oracle"].scored == pytest.approx(1.0)
    # with a tail sample it also attends every 10th other host key (of ctx - 20): at most ⌈(ctx - 20) / 10⌉ more
    tail = pts["oracle + tail"].attended - pts["oracle"].attended
    assert 0 < tail <= float((torch.ceil((ctx - 20) / 10) / ctx).mean()) + 1e-6
    # topk keeps at most its budget of the candidates it scored
    assert pts["topk"].attended <= pts["oracle"].attended + 1e-6 and pts["topk"].attended <= pts["topk"].scored
    # a layer left dense attends everything: the mean over the 2 layers is halfway
    assert pts["half-dense"].per_layer[0] == 1.0
    assert pts["half-dense"].attended == pytest.approx((1 + pts["static"].attended) / 2)
    assert pts["oracle"].kl < pts["static"].kl


def test_too_short_a_text_is_refused(setup):
    model, ids, cache = setup
    with pytest.raises(ValueError, match="kvpass frontier: need ids"):
        fr.frontier(model, ids, {"dense": None}, prefix=PREFIX, tokens=TOKENS + 5, cache=cache)


def test_retrieval_recall_uses_the_kernels_candidates(setup):
    model, ids, cache = setup
    wide = {"estimator": "sample", "window_size": 16, "lsh_k": 1, "lsh_l": 8, "lsh_threshold": 1}
    narrow = {"estimator": "sample", "window_size": 16, "lsh_k": 12, "lsh_l": 2, "lsh_threshold": 2}
    recalls = {}
    for name, opts in (("wide", wide), ("narrow", narrow)):
        _, dec = fr.teacher_forced(model, ids, PREFIX, TOKENS, opts, cache, recall_every=3)
        assert len(dec.recall) == 2 * 4 and dec.candidate_mismatch == 0  # 2 layers x steps 0, 3, 6, 9
        recalls[name] = (sum(dec.recall) / len(dec.recall), sum(dec.mass) / len(dec.mass))
    assert recalls["wide"][0] > 0.95 and recalls["wide"][1] > 0.95  # nearly every key collides somewhere
    assert recalls["narrow"][0] < 0.5 and recalls["narrow"][1] < recalls["wide"][1]


def test_eval_frontier_cli_writes_table_json_and_plot(tmp_path, monkeypatch, capsys):
    """`kvpass eval --frontier`: one run per prefix, the table, the JSON (with the definition of keys
    attended) and the PNG; a random-weight model stands in for the real one."""
    import json

    from transformers import AutoTokenizer

    from kvpass import cli
    from kvpass.models import DEFAULT_GGUF, default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()), gguf_file=DEFAULT_GGUF)
    model = tiny_model("llama", vocab_size=tok.vocab_size + 64)
    monkeypatch.setattr(cli, "_load", lambda name, job: (model, tok, "tiny"))
    monkeypatch.setattr(fr, "sweep", lambda quick: {"dense": None, "static-only": {"estimator": "none"},
                                                    "magicpig": {"preset": "magicpig", "lsh_k": 4, "lsh_l": 20}})
    out_json, out_png = tmp_path / "f.json", tmp_path / "f.png"
    assert cli.main(["eval", "--frontier", "--prefix", "400", "500", "--text-tokens", "6", "--recall-every", "3",
                     "--json", str(out_json), "--plot", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "400-token prefix" in text and "500-token prefix" in text and "keys attended" in text
    js = json.loads(out_json.read_text())
    assert set(js["runs"]) == {"400", "500"} and "Keys attended" in js["meta"]["definition"]
    magic = next(p for p in js["runs"]["500"] if p["config"] == "magicpig")
    assert 0 < magic["keys_attended"] < 1 and magic["retriever_recall_top1pct"] is not None
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_distinct_keys_a_gqa_group_chose(setup):
    """``distinct``: the keys a kv head's query heads chose (2 here), counted once per group, per key chosen —
    1/2 when both heads choose the same keys, 1 when they share none; the count is the torch reproduction's
    of the kernel's candidates (checked against the kernel's per-row count)."""
    model, ids, cache = setup
    pts = fr.frontier(model, ids, {"sketch": {"window_size": 16, "budget": 40}, "oracle": {"estimator": "oracle"}},
                      prefix=PREFIX, tokens=TOKENS, cache=cache, recall_every=3)
    sketch = pts[0]
    assert 0.5 <= sketch.distinct < 1.0
    assert pts[1].distinct is None  # the oracle retrieves nothing: no recall measured
    _, dec = fr.teacher_forced(model, ids, PREFIX, TOKENS, {"window_size": 16, "budget": 40}, cache, recall_every=3)
    assert dec.candidate_mismatch == 0 and dec.candidates == 2 * 4 * 2 * 2 * 40  # layers x steps x kv x q heads


def test_the_bytes_read_are_the_kernels_count(setup):
    """``bytes_read``: what the kernel read (its own counters: the int4 sketch of every offloaded key, D/2
    bytes, and the distinct K/V rows) over the offloaded keys' K and V (2·D fp32 each): exact reads every row
    and no code, exactly 1; the oracle every K row and the V rows of the keys it keeps, a little over 1/2;
    the sketch its 1/16 and the rows of its head and tail."""
    model, ids, cache = setup
    configs = {"sketch": {"window_size": 16, "budget": 40}, "exact": {"estimator": "exact"},
               "oracle": {"estimator": "oracle"}, "none": {"estimator": "none"}}
    sketch, exact, oracle, none = pts = fr.frontier(model, ids, configs, prefix=PREFIX, tokens=TOKENS, cache=cache)
    assert exact.bytes_read == 1.0 and none.bytes_read is None
    assert 0.5 < oracle.bytes_read < 0.55
    assert 1 / 16 < sketch.bytes_read < 1 / 16 + 2 * 40 / 350 + 0.02
    assert "bytes read" in fr.format_points(pts)


def test_the_rotated_retriever_is_fitted_to_the_prefill_and_checked_per_layer(setup):
    """retriever "rotated" in the frontier's decoder: each store is coded from the dense prefill's queries
    (as a compiled prefill hands them over), the kernel's candidates are the torch definition's at every
    measured step, and the recall is reported per layer, its mean the overall one."""
    model, ids, cache = setup
    opts = {"retriever": "rotated", "window_size": 16, "budget": 40}
    _, dec = fr.teacher_forced(model, ids, PREFIX, TOKENS, opts, cache, recall_every=3)
    assert dec.candidate_mismatch == 0 and len(dec.recall) == 2 * 4
    want = fr.prefill_q_sq(cache)
    for site, store in dec.stores.items():
        assert store.index.coded
        kv = store.num_kv_heads
        torch.testing.assert_close(store.index.q_sq, want[site].reshape(1, kv, -1, want[site].shape[-1]).mean(2))
    pt = fr.frontier(model, ids, {"rotated": opts}, prefix=PREFIX, tokens=TOKENS, cache=cache, recall_every=3)[0]
    assert set(pt.recall_per_layer) == set(dec.stores)
    assert pt.recall == pytest.approx(sum(pt.recall_per_layer.values()) / len(pt.recall_per_layer))


def test_eval_frontier_only_runs_the_named_configurations(tmp_path, monkeypatch, capsys):
    import json

    from transformers import AutoTokenizer

    from kvpass import cli
    from kvpass.models import DEFAULT_GGUF, default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()), gguf_file=DEFAULT_GGUF)
    model = tiny_model("llama", vocab_size=tok.vocab_size + 64)
    monkeypatch.setattr(cli, "_load", lambda name, job: (model, tok, "tiny"))
    out_json = tmp_path / "f.json"
    assert cli.main(["eval", "--frontier", "--prefix", "400", "--text-tokens", "3", "--only", "rotated 1.5% + 1/100",
                     "--json", str(out_json), "--plot", ""]) == 0
    points = json.loads(out_json.read_text())["runs"]["400"]
    assert [p["config"] for p in points] == ["dense", "rotated 1.5% + 1/100"]
    assert points[1]["options"]["retriever"] == "rotated"
    with pytest.raises(SystemExit):  # one line, exit 2
        cli.main(["eval", "--frontier", "--prefix", "400", "--text-tokens", "3", "--only", "rotated 9%", "--plot", ""])
    assert "no configuration ['rotated 9%'] in the frontier's sweep" in capsys.readouterr().err
