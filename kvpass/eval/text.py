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


DEFAULT_QUESTIONS = ("What does the text say about the global statement?",
                     "Which special method makes an object callable?",
                     "What happens when a with statement's body raises an exception?")


def document_and_questions(tokenizer, questions, *, text: str | None = None, n_tokens: int = 4096):
    """A long document and questions about it, as token ids that share the document as a prefix: (doc
    [1, T], [(question, ids [1, n]) ...]); ``doc`` followed by a question's ids is the chat prompt
    "document, then question" (``long_document_prompt``'s form).  ``text``: the document (default:
    ``n_tokens`` tokens of the Python Language Reference); no questions: ``DEFAULT_QUESTIONS``."""
    mark = "\x00KVPASS-QUESTION\x00"
    if text is None:
        prompt = long_document_prompt(tokenizer, n_tokens, mark)
    else:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"{text}\n\n{mark}"}], tokenize=False,
                                               add_generation_prompt=True)
    head, tail = prompt.split(mark)
    head, gap = head[:len(head.rstrip())], head[len(head.rstrip()):]  # the blank line goes with the question

    def ids(s: str):
        return tokenizer(s, add_special_tokens=False, return_tensors="pt")["input_ids"]

    return ids(head), [(q, ids(gap + q + tail)) for q in (questions or DEFAULT_QUESTIONS)]


SOURCE_MODULES = ("typing", "inspect", "dataclasses", "functools", "argparse", "ast", "enum", "pathlib",
                  "subprocess", "threading", "tarfile", "zipfile")


def python_source_text(modules: tuple[str, ...] = SOURCE_MODULES) -> str:
    """CPython's own standard-library sources (the running interpreter's ``.py`` files, ~1 MB in all):
    long real code, the Qwen2.5-Coder models' own domain."""
    import sysconfig
    from pathlib import Path

    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((lib / f"{m}.py").read_text() for m in modules if (lib / f"{m}.py").exists())
