"""Real text for prompts and evaluation, from files that installed packages ship (never written for
kvpass): the Python Language Reference topics that CPython's ``pydoc_data`` carries."""

from __future__ import annotations


def reference_text(topics: tuple[str, ...] = ("assignment", "compound", "datamodel")) -> str:
    """Chapters of the Python Language Reference, as plain text (~100k words in all topics)."""
    from pydoc_data.topics import topics as all_topics

    return "\n\n".join(all_topics[t].strip() for t in topics if t in all_topics)


def long_document_prompt(tokenizer, n_tokens: int, question: str) -> str:
    """A chat prompt: a document of about ``n_tokens`` tokens of real text, then ``question``."""
    ids = tokenizer(reference_text(), add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:  # longer than the three chapters: the whole Language Reference
        from pydoc_data.topics import topics

        ids = tokenizer(reference_text(tuple(sorted(topics))), add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise ValueError(f"kvpass: the Python Language Reference holds {len(ids)} tokens for this tokenizer; "
                         f"{n_tokens} were asked")
    doc = tokenizer.decode(ids[:n_tokens])
    messages = [{"role": "user", "content": f"{doc}\n\n{question}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


SOURCE_MODULES = ("typing", "inspect", "dataclasses", "functools", "argparse", "ast", "enum", "pathlib",
                  "subprocess", "threading", "tarfile", "zipfile")


def python_source_text(modules: tuple[str, ...] = SOURCE_MODULES) -> str:
    """CPython's own standard-library sources (the running interpreter's ``.py`` files, ~1 MB in all):
    long real code, the Qwen2.5-Coder models' own domain."""
    import sysconfig
    from pathlib import Path

    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((lib / f"{m}.py").read_text() for m in modules if (lib / f"{m}.py").exists())
