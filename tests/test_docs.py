"""The README and docs/ hold up: a README a user reads in minutes, links that resolve, the options reference
equal to the declarations, and the README's commands and quick start the ones that run."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but '-' and '_'), spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    found, in_code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6} (.+)", line)):
            found.add(_slug(m.group(1)))
    return found


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # code blocks hold no links
    return LINK.findall(text)


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 300


def test_every_page_says_first_what_it_shows():
    for page in PAGES:
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# "), f"{page.name}: no title"
        assert next(line for line in lines[1:] if line.strip()), f"{page.name}: nothing under the title"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    links = _links(page)
    assert page != README or len(links) >= 6, "the README links into docs/"
    for link in links:
        if re.match(r"[a-z]+://", link) or link.startswith("mailto:"):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: the link {link!r} points to nothing"
        assert ROOT in path.parents, f"{page.name}: the link {link!r} leaves the project (a user's clone has no ../)"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{page.name}: {link!r}: no heading with that anchor in {path.name}"


def test_the_link_check_can_fail(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# T\n\n## A heading, `code` and all\n\n[x](nothing.md) [y](#a-heading-code-and-all)\n")
    assert _links(page) == ["nothing.md", "#a-heading-code-and-all"]
    assert "a-heading-code-and-all" in _anchors(page)
    assert not (tmp_path / "nothing.md").exists()


def test_docs_options_is_what_kvpass_options_prints_and_options_declares(capsys):
    import dataclasses

    from kvpass.runtime.config import PRESETS, Options, options_reference

    from kvpass.cli import main

    page = (ROOT / "docs" / "options.md").read_text()
    assert main(["options"]) == 0
    printed = capsys.readouterr().out
    assert printed == page, "docs/options.md is stale: regenerate it with `kvpass options > docs/options.md`"
    assert printed == options_reference() + "\n"
    for f in dataclasses.fields(Options):  # each knob with its declared default, range and doc
        knob = Options.knob(f.name)
        assert f"### `{f.name}`\n\n`{f.type}`, default `{getattr(Options(), f.name)!r}`; {knob.accepted()}." in page
        assert knob.doc in page
    for name, values in PRESETS.items():
        assert f"### `{name}`" in page
        assert all(f"| `{k}` | `{v!r}` |" in page for k, v in values.items())


def test_a_changed_declaration_changes_the_reference(monkeypatch):
    from kvpass.runtime.config import Options, options_reference

    before = options_reference()
    monkeypatch.setattr(Options.knob("window_size"), "lo", 8)
    after = options_reference()
    assert before != after and "int >= 8" in after


def _block(lang: str, after: str) -> str:
    """The first ```lang code block after the line containing ``after``."""
    text = README.read_text()
    start = text.index(after)
    m = re.search(rf"```{lang}\n(.*?)```", text[start:], flags=re.DOTALL)
    assert m, f"no {lang} block after {after!r}"
    return m.group(1)


def test_the_readme_test_command_is_what_ci_runs():
    commands = [line.split("#")[0].strip() for line in _block("bash", "## Install").splitlines()]
    commands = [c for c in commands if c]
    assert commands[0] == "bash scripts/setup.sh && kvpass generate"
    assert commands[1] == "bash scripts/test.sh"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == [commands[1]]
    assert shlex.split(commands[0])[:2] == ["bash", "scripts/setup.sh"] and (ROOT / "scripts/setup.sh").exists()


@pytest.mark.slow
def test_the_quick_start_runs_as_written(capsys):
    """The README's quick start, executed as it is printed (SmolLM2, the defaults, Inductor)."""
    import kvpass

    code = _block("python", "## Quick start")
    kvpass.reset()
    scope: dict = {}
    exec(compile(code, "README.md: quick start", "exec"), scope)  # noqa: S102 (the README's own code, as printed)
    out = capsys.readouterr().out
    assert "rewritten" in out and scope["report"].sites, "explain's table was printed"
    assert all(s.rewritten for s in scope["report"].sites)
    assert scope["text"].strip(), "the model answered"
    assert kvpass.runtime_stats()["tokens_offloaded"] > 0
    kvpass.reset()
