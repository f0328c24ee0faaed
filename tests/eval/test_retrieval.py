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


def test_more_bits_and_more_candidates_find_more_of_the_exact_top():
    k, q = _keys(4096, 64)
    rows = retrieval.site_study(q.reshape(1, 6, 2, 64), k, 4096 + 64, 0.015, retrieval.Options())
    rot = {bits: rows[f"rotated int{bits}, whitened, step per key" if bits > 1 else "rotated 1 bit (sign), whitened"]
           for bits in retrieval.BITS}
    for bits in retrieval.BITS:
        recall = [rot[bits][1][c] for c in retrieval.CS]
        assert recall == sorted(recall) and all(0 <= r <= 1 for r in recall)
    assert rot[4][1][2] > rot[2][1][2] > rot[1][1][2]
    assert rot[4][1][8] >= 0.99 and rot[4][0] == 64 * 4 / 8 + 2


def test_the_study_runs_on_a_model_and_prints_a_row_per_code():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(3, 256, (1, 700), generator=torch.Generator().manual_seed(0))
    sites = retrieval.capture(model, ids, 680, 20)
    assert len(sites) == 2 and next(iter(sites.values()))[0].shape[2] == 20
    rows = retrieval.study(sites, 680, 0.05)
    table = retrieval.format_rows(rows)
    assert len(rows) == 1 + len(retrieval.BITS) + 2 * len(retrieval.STAGED) and table.count("\n") == len(rows) + 1
    for r in rows:
        assert all(0 <= v <= 1 for v in [*r.recall.values(), *r.mass.values()])
        assert r.worst_layer[2] <= r.recall[2] + 1e-9 and r.worst_site[2] in sites
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
    assert data["context"] == 512 and len(data["rows"]) == 9
