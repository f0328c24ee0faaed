"""Options: presets are named option sets under the user's own keys."""

import pytest
from kvpass.runtime.config import PRESETS, Options, parse_options


def test_magicpig_preset_is_the_papers_configuration():
    o = parse_options({"preset": "magicpig"})
    assert (o.estimator, o.lsh_k, o.lsh_l, o.lsh_threshold, o.sink_size, o.window_size) == \
        ("sample", 10, 150, 2, 4, 64)


def test_keys_beside_a_preset_override_it():
    o = parse_options({"preset": "magicpig", "lsh_k": 8}, window_size=128)
    assert (o.lsh_k, o.lsh_l, o.window_size) == (8, 150, 128)


def test_every_preset_is_valid_options():
    for name, values in PRESETS.items():
        assert Options(**values) == parse_options({"preset": name})


def test_unknown_preset_names_the_presets():
    with pytest.raises(ValueError, match=r"unknown preset 'magicpg'; presets are \['magicpig'"):
        parse_options({"preset": "magicpg"})


def test_cli_preset_is_validated_with_the_options_given_beside_it(monkeypatch, capsys):
    from kvpass import cli

    seen = {}

    def stop(name, job, weights="fp32"):  # the options are parsed before any model loads
        seen["weights"] = weights
        raise SystemExit(0)

    monkeypatch.setattr(cli, "_load", stop)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--preset", "magicpig", "--window-size", "0"])
    assert exit_.value.code == 2 and "window_size must be an int >= 1" in capsys.readouterr().err
    orig = cli.parse_options
    monkeypatch.setattr(cli, "parse_options", lambda o: seen.setdefault("opts", orig(o)))
    with pytest.raises(SystemExit):
        cli.main(["generate", "--preset", "magicpig", "--estimator", "topk"])
    assert seen["opts"].estimator == "topk" and seen["opts"].lsh_l == 150
    assert seen["opts"].tail_stride == 0  # the preset has no tail; --tail-stride sets one
    seen.clear()
    with pytest.raises(SystemExit):
        cli.main(["generate", "--tail-stride", "64", "--budget", "0.01"])
    assert seen["opts"].tail_stride == 64 and seen["opts"].budget == 0.01 and seen["weights"] == "fp32"
    with pytest.raises(SystemExit):
        cli.main(["generate", "--weights", "int4"])
    assert seen["weights"] == "int4"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--tail-stride", "-1"])
    assert exit_.value.code == 2 and "tail_stride must be an int >= 0" in capsys.readouterr().err
