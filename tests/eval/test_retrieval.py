"""The rotated code's reference definitions and the retrieval study (``kvpass eval --retrieval``)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvpass.lowering.reference import (
    best_of,
    rotated_codes,
    rotated_query,
    rotated_scores,
    rotated_std,
    rotated_unit,
    rotation,
    staged_candidates,
)

from kvpass.eval import retrieval
from kvpass.testing import tiny_model


def _keys(n=2048, D=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, n, D, generator=gen) * torch.linspace(0.1, 4, D) + torch.randn(D, generator=gen)
    return k, torch.randn(1, 2, 3, 2, D, generator=gen)


def test_the_rotation_is_orthogonal_and_seeded():
    r = rotation(48, 7)
    assert torch.allclose(r @ r.T, torch.eye(48), atol=1e-5)
    assert torch.equal(r, rotation(48, 7)) and not torch.equal(r, rotation(48, 8))


@settings(max_examples=20, deadline=None)
@given(bits=st.integers(1, 8), D=st.sampled_from([8, 20, 64]), seed=st.integers(0, 1000))
def test_codes_estimate_the_centred_inner_product(bits, D, seed):
    """Dequantised, the codes give q·(k − μ) up to the quantiser's error, which halves with each bit; the
    codes stay in [0, 2^bits)."""
    k, q = _keys(512, D, seed)
    mu = k.mean(2)
    std, rot = rotated_std(k, mu), rotation(D, seed)
    codes, step = rotated_codes(k, mu, std, rot, bits)
    assert int(codes.max()) < 2 ** bits and codes.dtype == torch.uint8
    est = rotated_scores(rotated_query(q, std, rot), codes, step, bits)
    true = q @ (k - mu[:, :, None]).transpose(-1, -2)[:, :, None]
    err = (est - true).pow(2).mean().sqrt() / true.pow(2).mean().sqrt()
    assert err < 1.2 * 0.6 ** bits + 0.01  # 1 bit: ~0.6 (SimHash), 4 bits: ~0.1, 8 bits: ~0.01


@settings(max_examples=20, deadline=None)
@given(bits=st.integers(2, 6), planes=st.integers(1, 5), seed=st.integers(0, 1000))
def test_the_high_planes_are_the_same_code_with_fewer_bits(bits, planes, seed):
    """Scoring the high h bit planes of a b-bit code = scoring the h-bit code with 2^(b−h) times the step
    (both the middle of the same interval) — what a scan of the high planes reads."""
    planes = min(planes, bits)
    k, q = _keys(256, 16, seed)
    mu = k.mean(2)
    std, rot = rotated_std(k, mu), rotation(16, seed)
    codes, step = rotated_codes(k, mu, std, rot, bits)
    qt = rotated_query(q, std, rot)
    high = rotated_scores(qt, codes, step, bits, planes)
    same = rotated_scores(qt, codes >> (bits - planes), step * 2 ** (bits - planes), planes)
    assert torch.allclose(high, same, rtol=1e-4, atol=1e-3)


def test_the_sketchs_planes_all_read_are_its_own_scores():
    """All 4 planes of the int4 sketch score as the sketch does (before the query's rounding); 3 planes
    order keys nearly as 4 do."""
    from kvpass.lowering.reference import sketch_codes, sketch_plane_scores, sketch_project, sketch_scale

    k, q = _keys(512, 32)
    mu = k.mean(2)
    scale = sketch_scale(k, mu, 4)
    codes = sketch_codes(k, mu, scale, 4)
    full = sketch_project(q, scale) @ codes.float().transpose(-1, -2)[:, :, None]
    assert torch.allclose(sketch_plane_scores(q, codes, scale, 4), full, rtol=1e-5, atol=1e-4)
    three = sketch_plane_scores(q, codes, scale, 3)
    assert float(torch.corrcoef(torch.stack([three.flatten(), full.flatten()]))[0, 1]) > 0.95


def test_a_staged_ranking_that_keeps_every_key_first_is_the_full_ranking():
    k, q = _keys()
    mu = k.mean(2)
    std, rot = rotated_std(k, mu), rotation(32, 0)
    codes, step = rotated_codes(k, mu, std, rot, 4)
    qt = rotated_query(q, std, rot)
    full = best_of(rotated_scores(qt, codes, step, 4), 30)
    coarse, scores = rotated_scores(qt, codes, step, 4, 2), rotated_scores(qt, codes, step, 4)
    assert torch.equal(staged_candidates(coarse, scores, k.shape[2], 30), full)
    narrow = staged_candidates(coarse, scores, 60, 30)
    assert int(narrow.sum(-1).min()) == 30 and bool((narrow & ~full).any())  # stage 1 can lose keys


def _site(n=4096, D=64, seed=0):
    k, q = _keys(n + 64, D, seed)
    return retrieval.Site(q.reshape(1, 6, 2, D), k, q.reshape(1, 6, 2, D).pow(2).mean(2))


def test_more_bits_and_more_candidates_find_more_of_the_exact_top():
    rows = retrieval.site_study(_site(), 4096 + 64, 0.015, retrieval.Options())
    rot = {bits: rows[f"rotated int{bits}, whitened, step per key" if bits > 1 else "rotated 1 bit (sign), whitened"]
           for bits in retrieval.BITS}
    for bits in retrieval.BITS:
        recall = [rot[bits][1][c] for c in retrieval.CS]
        assert recall == sorted(recall) and all(0 <= r <= 1 for r in recall) and 0 <= rot[bits][3] <= 1
    assert rot[4][1][2] > rot[2][1][2] > rot[1][1][2]
    assert rot[4][3] > rot[2][3] > rot[1][3]  # the top 1% in B too
    assert rot[4][1][8] >= 0.99 and rot[4][0] == 64 * 4 / 8 + 2


def test_the_query_aware_unit_minimises_the_score_error():
    """Keys whose spread differs by dimension, read by queries whose size per dimension is unrelated to it
    (whitening is optimal only when it is inverse to the keys', no unit when it is proportional): the
    query-aware unit's codes estimate q·(k − μ) with less error than either, as its derivation says (about
    a third of it here); no queries at all gives whitening's shape."""
    gen = torch.Generator().manual_seed(3)
    D = 32
    spread = torch.logspace(-1, 0.5, D)
    k = torch.randn(1, 1, 4096, D, generator=gen) * spread
    q = torch.randn(1, 1, 1, 256, D, generator=gen) * spread[torch.randperm(D, generator=gen)]
    mu = k.mean(2)
    std, rot = rotated_std(k, mu), rotation(D, 0)
    q_sq = q.pow(2).mean((2, 3))
    true = q @ (k - mu[:, :, None]).transpose(-1, -2)[:, :, None]

    def error(unit):
        codes, step = rotated_codes(k, mu, unit, rot, 3)
        return float((rotated_scores(rotated_query(q, unit, rot), codes, step, 3) - true).pow(2).mean())

    aware, white, plain = error(rotated_unit(std, q_sq)), error(std), error(torch.ones_like(std))
    assert aware < 0.5 * min(white, plain)
    assert torch.equal(rotated_unit(std), std) and torch.equal(rotated_unit(std, torch.zeros_like(q_sq)), std.sqrt())


def test_the_study_runs_on_a_model_and_prints_a_row_per_code():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(3, 256, (1, 700), generator=torch.Generator().manual_seed(0))
    sites = retrieval.capture(model, ids, 680, 20)
    site = next(iter(sites.values()))
    kv, D = model.config.num_key_value_heads, site.q.shape[-1]
    assert len(sites) == 2 and site.q.shape[2] == 20 and site.k.shape[1] == kv and site.k.shape[2] == 700
    assert site.q_sq.shape == (1, model.config.num_attention_heads, D) and site.v is None
    rows = retrieval.study(sites, 680, 0.05)
    table = retrieval.format_rows(rows)
    n_rows = 1 + len(retrieval.STAGED) + len(retrieval.BITS) + len(retrieval.QUERY_AWARE_BITS) + 2 * len(retrieval.STAGED)
    assert len(rows) == n_rows and table.count("\n") == len(rows) + 1
    for r in rows:
        assert all(0 <= v <= 1 for v in [*r.recall.values(), *r.mass.values(), r.top1pct])
        assert r.worst_layer[2] <= r.recall[2] + 1e-9 and r.worst_site[2] in sites
        assert r.top1pct_worst <= r.top1pct + 1e-9 and r.top1pct_worst_site in sites
        assert r.recall[max(r.recall)] >= r.recall[1]


@pytest.mark.parametrize("queries", [4])
def test_kvpass_eval_retrieval_on_the_cli(tmp_path, queries, capsys):
    import json

    from kvpass.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", "--retrieval", "--prefix", "512", "--queries", str(queries), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rotated int4" in printed and "| code |" in printed
    data = json.loads(out.read_text())
    assert data["context"] == 512 and len(data["rows"]) == 13
