"""kvpass eval's pieces: the task generators, the real-text metrics, the reports and plots."""

import random
from collections import Counter

import pytest
import torch

from kvpass.eval import evaluate as ev
from kvpass.eval import tasks
from kvpass.testing import tiny_model


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from kvpass.models import DEFAULT_GGUF, default_model_dir

    return AutoTokenizer.from_pretrained(str(default_model_dir()), gguf_file=DEFAULT_GGUF)


@pytest.mark.parametrize("name", list(tasks.TASKS))
@pytest.mark.parametrize("length", [1024, 3000])
def test_task_prompts_hold_their_answers_at_the_asked_length(tok, name, length):
    s = tasks.TASKS[name](tok, length, 0.5, random.Random(3))
    assert 0.85 * length <= s.ids.shape[1] <= 1.05 * length, s.ids.shape
    text = tok.decode(s.ids[0])
    assert s.answers and all(a in text for a in s.answers)
    assert s.score(" ".join(s.answers)) == 1.0 and s.score("nothing") == 0.0
    if name == "common-words":  # the answers are the most frequent words of the list
        words = Counter(w for w in text.split() if w.isalpha() and w.islower())
        least_common_answer = min(words[a] for a in s.answers)
        others = [c for w, c in words.items() if w not in s.answers and w in tasks.vocabulary()]
        assert least_common_answer > max(others)
    # the question is the prompt's last ``question`` tokens; the answer is not in it
    question = tok.decode(s.ids[0, -s.question:])
    assert 5 < s.question < 80 and question.split()[0] in ("What", "Find", "Question:"), question
    assert not any(a in question for a in s.answers if a.isdigit())
    if name == "niah-single":  # the needle sits near the middle
        at = text.index(s.answers[0]) / len(text)
        assert 0.35 < at < 0.65


def test_configs_cover_every_budget():
    cfg = ev.configs_for(ev.BUDGETS)
    assert cfg["dense"] is None and cfg["static-only"] == {"estimator": "none"}
    for b in ev.BUDGETS:
        assert cfg[f"oracle@{b:.0%}"] == {"estimator": "oracle", "budget": b}
        assert cfg[f"kvpass-sample@K={ev.SAMPLE_BITS[b]}"]["lsh_k"] == ev.SAMPLE_BITS[b]
    assert set(ev.CONFIGS) == {"dense", "static-only", "oracle", "kvpass-topk", "kvpass-sample"}


def test_text_quality_measures_distance_from_dense(tok, monkeypatch):
    """Random-weight model with the tokenizer's vocabulary: dense scores KL 0; kvpass-exact equals dense
    (KL ~ 0, same perplexity); static-only (which drops most of the context) does not."""
    model = tiny_model("llama", vocab_size=tok.vocab_size + 64)
    configs = {"dense": None, "exact": {"estimator": "exact"}, "static-only": {"estimator": "none"}}
    res = {r.config: r for r in ev.text_quality(model, tok, configs, prefix=400, tokens=24, window_size=16)}
    assert res["dense"].kl == 0.0
    assert res["exact"].kl < 1e-6 and abs(res["exact"].ppl / res["dense"].ppl - 1) < 1e-4
    assert res["exact"].keys_read == pytest.approx(1.0)
    assert res["static-only"].kl > 100 * max(res["exact"].kl, 1e-9)
    table = ev.format_text(list(res.values()))
    assert "static-only" in table and "perplexity" in table


def test_reports_and_plots(tmp_path):
    tr = [ev.TaskResult("dense", "passkey", "question", [1, 1], [], {(1024, 0.5): 1.0, (2048, 0.5): 1.0}),
          ev.TaskResult("static-only", "passkey", "question", [0, 0], [0.01, 0.01],
                        {(1024, 0.5): 0.0, (2048, 0.5): 0.0}),
          ev.TaskResult("kvpass", "passkey", "question", [1, 0], [0.03, 0.02], {(1024, 0.5): 1.0, (2048, 0.5): 0.0}),
          ev.TaskResult("kvpass", "niah-single", "question", [1.0], [0.025], {(1024, 0.5): 1.0}),
          ev.TaskResult("kvpass", "passkey", "generation", [1, 1], [0.04, 0.04], {(1024, 0.5): 1.0, (2048, 0.5): 1.0})]
    xr = [ev.TextResult("dense", 1.6, 0.0, None, 64), ev.TextResult("static-only", 1.9, 0.2, None, 64),
          ev.TextResult("kvpass-sample@K=11", 1.7, 0.05, 0.012, 64),
          ev.TextResult("kvpass-sample@K=10", 1.65, 0.04, 0.027, 64)]
    table = ev.format_tasks(tr)
    assert "passkey" in table and "niah-single" in table and "2.50%" in table  # mean over the samples
    assert "generation" in table and "4.00%" in table
    out = tmp_path / "eval.png"
    ev.plot(out, tr, xr, "SmolLM2-135M-Instruct — test machine")
    for p in (out, tmp_path / "eval-passkey-heatmap.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    js = ev.to_json(tr, xr, {"machine": "m"})
    assert js["text"][2]["keys_read"] == 0.012 and js["tasks"][0]["cells"][0]["score"] == 1.0


def test_document_is_real_shipped_text(tok):
    ids = ev.document_ids(tok, 5000)
    assert ids.shape == (1, 5000)
    assert "assignment" in tok.decode(ids[0, :300]).lower()
    assert torch.unique(ids).numel() > 800


def _compiled_answer(model, s, options, setup):
    """Ground truth through torch.compile(backend="kvpass"): ``generation``: ``generate`` on the prompt (a
    dense prefill, then decode steps); ``question``: the context prefilled, the question's tokens fed one
    decode step at a time, then greedy steps (end-of-sequence suppressed, as min_new_tokens does)."""
    from transformers import DynamicCache

    import kvpass
    from kvpass.hf import cache_kwarg, greedy

    fwd = model.forward
    torch._dynamo.reset()
    kvpass.reset()
    model.forward = torch.compile(fwd, backend="kvpass", options={**options, "inductor": False})
    n, q = s.ids.shape[1], s.question
    try:
        if setup == "generation":
            return greedy(model, s.ids, s.new_tokens)[0][0, n:].tolist()
        cache, out = DynamicCache(config=model.config), []
        with torch.no_grad():
            model(input_ids=s.ids[:, :n - q], use_cache=True, **{cache_kwarg(): cache})
            feed = [s.ids[:, t:t + 1] for t in range(n - q, n)]
            while len(out) < s.new_tokens:
                logits = model(input_ids=feed.pop(0), use_cache=True, **{cache_kwarg(): cache}).logits[0, -1]
                if not feed:
                    eos = model.generation_config.eos_token_id
                    if eos is not None:
                        logits[eos] = -float("inf")
                    out.append(int(logits.argmax()))
                    feed = [torch.tensor([[out[-1]]])]
        return out
    finally:
        model.forward = fwd
        torch._dynamo.reset()
        kvpass.reset()


def test_tasks_decode_as_the_compiled_model_does(tok):
    """run_tasks' shared-prefill engine gives the tokens the compiled model gives, in both set-ups, for the
    defaults (sketch topk), the MagicPIG preset and static-only; dense is the model's own ``generate``."""
    from kvpass.hf import greedy

    model = tiny_model("llama", vocab_size=tok.vocab_size + 64)
    model.generation_config.eos_token_id = 7  # suppressed: every answer runs its full length
    gen = torch.Generator().manual_seed(5)
    samples = [tasks.Sample("rand", 440, 0.5, torch.randint(10, tok.vocab_size, (1, 440), generator=gen), ["x"], 6, q)
               for q in (1, 12)]
    # a prompt that begins as the last did: the engine reuses that part of its dense cache
    tail = torch.randint(10, tok.vocab_size, (1, 150), generator=gen)
    samples.append(tasks.Sample("rand", 450, 0.5, torch.cat([samples[1].ids[:, :300], tail], 1), ["x"], 6, 7))
    configs = {"dense": None, "kvpass": {"window_size": 16, "budget": 24},
               "magicpig": {"preset": "magicpig", "window_size": 16, "lsh_k": 4, "lsh_l": 20},
               "static-only": {"estimator": "none", "window_size": 16}}
    results = ev.run_tasks(model, tok, samples, configs)
    assert {(r.config, r.setup) for r in results} == {(c, u) for c in configs for u in ev.SETUPS}
    for r in results:
        for s, got in zip(samples, r.outputs):
            if r.config == "dense":
                want = greedy(model, s.ids, s.new_tokens)[0][0, s.ids.shape[1]:].tolist()
            else:
                want = _compiled_answer(model, s, configs[r.config], r.setup)
            assert got == want, (r.config, r.setup, s.question)
        if r.config != "dense":  # a fraction of the context's keys, static slots included
            assert all(0 < a < 1 for a in r.attended), r.attended
    att = {(r.config, r.setup): r.read for r in results}
    assert att[("static-only", "question")] < att[("kvpass", "question")]
    with pytest.raises(ValueError, match="unknown set-up"):
        ev.run_tasks(model, tok, samples, configs, setups=("prefill",))


def test_eval_cli_runs_the_tasks_in_both_setups(tok, tmp_path, monkeypatch, capsys):
    """`kvpass eval` on a random-weight model: the five task configurations x two set-ups in the table,
    the JSON and both PNGs; `--text-tokens 0` leaves out the real-text sweep."""
    import json

    from kvpass import cli

    model = tiny_model("llama", vocab_size=tok.vocab_size + 64)
    monkeypatch.setattr(cli, "_load", lambda name, job: (model, tok, "tiny"))
    out_json, out_png = tmp_path / "e.json", tmp_path / "e.png"
    assert cli.main(["eval", "--lengths", "420", "--depths", "0.5", "--tasks", "niah-single", "--ruler-lengths", "420",
                     "--text-tokens", "0", "--json", str(out_json), "--plot", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "real text" not in text.split("===")[-1]
    js = json.loads(out_json.read_text())
    rows = {(t["config"], t["setup"], t["task"]) for t in js["tasks"]}
    assert rows == {(c, u, t) for c in ev.TASK_CONFIGS for u in ev.SETUPS for t in ("passkey", "niah-single")}
    assert js["text"] == []
    for p in (out_png, tmp_path / "e-passkey-heatmap.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
