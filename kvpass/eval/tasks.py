"""RULER-style synthetic long-context tasks that need no data (Hsieh et al., 2024, "RULER"):
single- and multi-key needle in a haystack, variable tracking, common-words extraction.

Each generator returns a ``Sample``: plain-text prompt token ids of about ``length`` tokens (no chat
template: the completion form, as for the pass key), the expected answers, and how to score the
model's continuation (all answers present → 1; for lists, the fraction present).  Words come from
real text shipped with CPython (``pydoc_data``), numbers from a seeded generator.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

import torch

from kvpass.eval.text import reference_text

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class Sample:
    task: str
    length: int
    depth: float
    ids: torch.Tensor       # [1, T]
    answers: list[str]
    new_tokens: int
    question: int           # the prompt's last ``question`` tokens are the question (the rest: the context)

    def score(self, text: str) -> float:
        """Fraction of the expected answers found in the model's continuation."""
        return sum(a in text for a in self.answers) / len(self.answers)


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading tokens the 1-D id sequences ``a`` and ``b`` share."""
    m = min(len(a), len(b))
    return int((a[:m] == b[:m]).int().cumprod(0).sum())


def encode(tok, context: str, question: str) -> tuple[torch.Tensor, int]:
    """Token ids [1, T] of ``context + question`` and how many of the last ones are the question: those after
    the longest run of tokens the context alone tokenises to (a space may merge with the question's first
    word)."""
    ids = tok(context + question, return_tensors="pt")["input_ids"]
    same = common_prefix(ids[0], torch.tensor(tok(context)["input_ids"]))
    return ids, max(1, ids.shape[1] - same)


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """Distinct lowercase words (4-10 letters) of the Python Language Reference, in first-seen order."""
    seen = dict.fromkeys(re.findall(r"\b[a-z]{4,10}\b", reference_text(("assignment", "compound", "datamodel",
                                                                          "execmodel", "exprlists", "import"))))
    return tuple(seen)


def _haystack(tok, length: int, inserts: list[tuple[float, str]], prefix: str,
              question: str) -> tuple[torch.Tensor, int]:
    """Noise sentences up to ``length`` tokens with each (depth, sentence) of ``inserts`` placed at that
    depth, between ``prefix`` and ``question`` (``encode``'s result)."""
    fixed = len(tok(prefix + "".join(s for _, s in inserts) + question)["input_ids"])
    n = max(1, (length - fixed) // len(tok(NOISE)["input_ids"]))
    slots: dict[int, list[str]] = {}
    for depth, sentence in inserts:
        slots.setdefault(round(depth * n), []).append(sentence)
    parts = [prefix]
    for i in range(n + 1):
        parts.extend(slots.get(i, []))
        if i < n:
            parts.append(NOISE)
    return encode(tok, "".join(parts), question)


def niah_single(tok, length: int, depth: float, rng: random.Random) -> Sample:
    word, number = rng.choice(vocabulary()), str(rng.randint(1_000_000, 9_999_999))
    needle = f"One of the special magic numbers for {word} is: {number}. "
    prefix = "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    question = f"What is the special magic number for {word} mentioned in the text? The special magic number " \
               f"for {word} mentioned in the text is"
    ids, q = _haystack(tok, length, [(depth, needle)], prefix, question)
    return Sample("niah-single", length, depth, ids, [number], 12, q)


def niah_multikey(tok, length: int, depth: float, rng: random.Random, keys: int = 4) -> Sample:
    words = rng.sample(vocabulary(), keys)
    numbers = [str(rng.randint(1_000_000, 9_999_999)) for _ in words]
    depths = [depth] + [rng.random() for _ in range(keys - 1)]  # the asked-for key sits at ``depth``
    inserts = [(d, f"One of the special magic numbers for {w} is: {n}. ") for d, w, n in zip(depths, words, numbers)]
    prefix = "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    question = f"What is the special magic number for {words[0]} mentioned in the text? The special magic " \
               f"number for {words[0]} mentioned in the text is"
    ids, q = _haystack(tok, length, inserts, prefix, question)
    return Sample("niah-multikey", length, depth, ids, [numbers[0]], 12, q)


def variable_tracking(tok, length: int, depth: float, rng: random.Random, hops: int = 4) -> Sample:
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops)]
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}. "] + [f"VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, hops)]
    spread = [min(1.0, depth + i * (1 - depth) / hops) for i in range(hops)]  # in order, from ``depth`` on
    prefix = "Memorize and track the chain of variable assignment hidden in the following text. "
    question = f"Find all variables that are assigned the value {value} in the text above. Answer: According " \
               f"to the chain of variable assignment in the text above, {hops} variables are assigned the " \
               f"value {value}, they are:"
    ids, q = _haystack(tok, length, list(zip(spread, chain)), prefix, question)
    return Sample("variable-tracking", length, depth, ids, names, 8 * hops, q)


def common_words(tok, length: int, depth: float, rng: random.Random, common: int = 10) -> Sample:
    """A numbered list of words: ``common`` of them repeated often, the rest a few times; name the most
    common ones.  The list fills the context (depth is not used)."""
    pool = list(vocabulary())
    rng.shuffle(pool)
    frequent, rare = pool[:common], pool[common:]
    head = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the " \
           "ones that appear most often.\n"
    question = f"\nQuestion: What are the {common} most common words in the above list? Answer: The top " \
               f"{common} words that appear most often in the list are:"

    def build(n_items: int) -> str:
        reps = max(3, n_items // (2 * common))
        items = [w for w in frequent for _ in range(reps)]
        items += [rare[i % len(rare)] for i in range(max(0, n_items - len(items)))]  # each rare word once
        random.Random(n_items).shuffle(items)
        return head + " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))

    n_items = max(4 * common, length // 5)
    for _ in range(2):  # two corrections of the item count to land near ``length`` tokens
        used = len(tok(build(n_items) + question)["input_ids"])
        n_items = max(4 * common, int(n_items * length / used))
    ids, q = encode(tok, build(n_items), question)
    return Sample("common-words", length, 0.0, ids, frequent, 6 * common, q)


TASKS = {"niah-single": niah_single, "niah-multikey": niah_multikey, "variable-tracking": variable_tracking,
         "common-words": common_words}


def make_samples(tok, tasks, lengths, depths, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for name in tasks:
        for n in lengths:
            for d in (depths if name != "common-words" else [0.0]):
                out.append(TASKS[name](tok, n, d, rng))
    return out
