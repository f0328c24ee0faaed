"""``kvpass eval`` (first part): pass-key retrieval, kvpass configurations side by side with dense.

The landmark-attention / Quest style generator: filler sentences, one pass key at a chosen depth, the
question at the end.  Greedy decoding; a sample passes when the generated text contains the key.
Configurations: dense (the model unchanged), static only (sinks + window: StreamingLLM), oracle top-B,
kvpass-topk and kvpass-sample — the last three reading the fraction of keys reported per row.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
CONFIGS = {
    "dense": None,
    "static-only": {"estimator": "none"},
    "oracle": {"estimator": "oracle", "budget": 0.02},
    "kvpass-topk": {"estimator": "topk", "budget": 0.02},
    "kvpass-sample": {"estimator": "sample"},
}


@dataclass
class PasskeyResult:
    config: str
    passed: int = 0
    total: int = 0
    keys_read: list[float] = field(default_factory=list)
    cells: dict[tuple[int, float], bool] = field(default_factory=dict)  # (length, depth) → passed

    @property
    def accuracy(self) -> float:
        return self.passed / self.total if self.total else float("nan")


PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there. ")


def passkey_prompt(tok, length: int, depth: float, key: str) -> torch.Tensor:
    """Token ids [1, ~length] of plain text (no chat template: the completion form is what a small
    model answers reliably): preamble, filler with the key sentence at ``depth`` (0 = start, 1 = end),
    then the question, ending "The pass key is"."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    fixed = len(tok(PREAMBLE + needle + question)["input_ids"])
    n_fill = max(1, (length - fixed) // len(tok(FILLER)["input_ids"]))
    at = round(depth * n_fill)
    text = PREAMBLE + FILLER * at + needle + FILLER * (n_fill - at) + question
    return tok(text, return_tensors="pt")["input_ids"]


def passkey(model, tok, lengths, depths, *, configs=CONFIGS, sink_size: int = 4, window_size: int = 64,
            new_tokens: int = 10, seed: int = 0, progress=None) -> list[PasskeyResult]:
    """Accuracy of each configuration over every (length, depth).  ``progress``: a callable taking the
    number of finished samples (e.g. a tqdm's update)."""
    import kvpass
    from kvpass.testing import greedy

    rng = random.Random(seed)
    samples = [(n, d, str(rng.randint(10000, 99999))) for n in lengths for d in depths]
    prompts = [(n, d, key, passkey_prompt(tok, n, d, key)) for n, d, key in samples]
    results = []
    fwd = model.forward
    for name, opts in configs.items():
        res = PasskeyResult(name)
        try:
            if opts is not None:
                torch._dynamo.reset()
                model.forward = torch.compile(fwd, backend="kvpass", options={
                    "sink_size": sink_size, "window_size": window_size, "inductor": False, **opts})
            for n, d, key, ids in prompts:
                kvpass.reset()
                with torch.no_grad():
                    out, _ = greedy(model, ids, new_tokens)
                text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                ok = key in text
                res.passed += ok
                res.total += 1
                res.cells[(n, d)] = ok
                if opts is not None and opts["estimator"] != "none":
                    res.keys_read.append(kvpass.runtime_stats()["keys_read_fraction"])
                if progress:
                    progress(1)
        finally:
            model.forward = fwd
            torch._dynamo.reset()
        results.append(res)
    return results


def format_passkey(results: list[PasskeyResult]) -> str:
    lines = ["config         | pass key found | keys scored (of offloaded, last step)",
             "-------------- | -------------- | -------------------------------------"]
    for r in results:
        read = f"{sum(r.keys_read) / len(r.keys_read):.2%}" if r.keys_read else "-"
        lines.append(f"{r.config:14s} | {r.passed:3d}/{r.total:<3d} {r.accuracy:6.0%} | {read}")
    return "\n".join(lines)
