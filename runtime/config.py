"""kvpass's one configuration: ``Options``, each knob declared once with its type, range and doc.

Validated once where a user hands it in (``torch.compile(..., options=...)``, ``KVStore(...)``,
``export_onnx``, the CLI), then passed around as the object.  The runtime ops of a compiled graph take
it as one string (``to_op_string`` / ``from_op_string``, the only serialisation).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvpass.lowering.reference import ESTIMATORS, SKETCH_BITS


@dataclass
class Knob:
    """How one option is checked.  ``kind``: "int" (``lo``/``hi`` bounds, ``None`` = open), "choice"
    (one of ``choices``), "bool", or "custom" (``check`` returns an error or None).  ``runtime``: the
    knob changes what a store computes, so it travels to the ops in the op string."""
    doc: str
    kind: str = "int"
    lo: int | None = None
    hi: int | None = None
    choices: tuple = ()
    optional: bool = False  # None is accepted too
    runtime: bool = False
    check: Callable[[Any, Options], str | None] | None = None
    span: str = ""  # "custom": the accepted values in words, or the condition beside `choices`

    def accepted(self) -> str:
        """The accepted values in words, for the options reference (``kvpass options``)."""
        if self.kind == "int":
            rng = "any int" if self.lo is None and self.hi is None else \
                f"int >= {self.lo}" if self.hi is None else f"int in [{self.lo}, {self.hi}]"
        elif self.choices:  # "choice", or "custom" with a condition beside the choices (span)
            rng = "one of " + ", ".join(f"`{c!r}`" for c in self.choices) + (f" ({self.span})" if self.span else "")
        elif self.kind == "bool":
            rng = "`True` or `False`"
        else:
            rng = self.span
        return rng + (", or `None`" if self.optional else "")

    def error(self, name: str, val: Any, opts: Options) -> str | None:
        if val is None and self.optional:
            return None
        if self.kind == "int":
            ok = isinstance(val, int) and not isinstance(val, bool) and (self.lo is None or val >= self.lo) and \
                (self.hi is None or val <= self.hi)
            if ok:
                return None
            rng = f">= {self.lo}" if self.hi is None else f"in [{self.lo}, {self.hi}]"
            return f"{name} must be an int {rng}{' or None' if self.optional else ''}, got {val!r}"
        if self.kind == "choice":
            return None if val in self.choices else f"{name} must be one of {list(self.choices)}, got {val!r}"
        if self.kind == "bool":
            return None if val is True or val is False else f"{name} must be True or False, got {val!r}"
        return self.check(val, opts)


def knob(default: Any, doc: str, **spec) -> Any:
    return field(default=default, metadata={"knob": Knob(doc, **spec)})


def _budget_error(b, opts) -> str | None:
    if isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0 or (isinstance(b, float) and b > 1):
        return f"budget must be a fraction in (0, 1] (float) or a token count (int > 0), got {b!r}"
    return None


def _threshold_error(t, opts) -> str | None:
    hi = min(opts.lsh_l, 255)
    if isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= hi:
        return None
    return f"lsh_threshold must be an int in [1, min(lsh_l={opts.lsh_l}, 255)], got {t!r}"


RETRIEVERS = ("auto", "lsh", "sketch", "rotated")


def _retriever_error(r, opts) -> str | None:
    if r not in RETRIEVERS:
        return f"retriever must be one of {list(RETRIEVERS)}, got {r!r}"
    if r in ("sketch", "rotated") and opts.estimator == "sample":
        return (f"retriever={r!r} goes with estimator='topk' (or 'oracle'/'exact'/'none'): 'sample' weights "
                "each key by its LSH retrieval probability, which only the 'lsh' retriever has")
    if r == "rotated" and opts.sketch_bits != 4:
        return f"retriever='rotated' is an int4 code; sketch_bits={opts.sketch_bits} is the 'sketch' retriever's"
    return None


def _layers_error(layers, opts) -> str | None:
    ok = isinstance(layers, tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    return None if ok else f"dense_layers must be a list of layer indices, got {layers!r}"


@dataclass(frozen=True)
class Options:
    """The knobs of kvpass (``torch.compile(..., backend="kvpass", options={...})``, ``KVStore``, export)."""
    sink_size: int = knob(4, "The first tokens of a sequence, kept on the model's device and attended by every "
                          "step (attention sinks).", lo=0, runtime=True)
    window_size: int = knob(64, "The most recent tokens, kept on the model's device and attended by every step. "
                            "Every other token lives in host memory.", lo=1, runtime=True)
    # the defaults are the measured frontier's best at <= 3% of the context's keys (docs/quality.md: "The
    # quality/keys frontier"); MagicPIG's configuration is the preset "magicpig"
    estimator: str = knob("topk", "How the host part (the offloaded keys) is attended. `'topk'`: the `budget` best "
                          "keys, found by `retriever`, attended with exact scores, plus the tail sample of "
                          "`tail_stride`. `'sample'`: LSH importance sampling, each retrieved key weighted by "
                          "1 / P(retrieved) (MagicPIG). `'oracle'`: the `budget` best of all offloaded keys, "
                          "scoring every one (a reference for evaluation). `'exact'`: every offloaded key (equals "
                          "dense attention: the correctness mode). `'none'`: the sinks and the window alone "
                          "(StreamingLLM).", kind="choice", choices=ESTIMATORS, runtime=True)
    budget: float | int = knob(0.015, "`topk`/`oracle`: the keys kept and counted exactly (the head), as a fraction "
                               "of the offloaded keys (float) or a count (int).", kind="custom",
                               check=_budget_error, runtime=True,
                               span="a float in (0, 1] (a fraction) or an int > 0 (a count)")
    # the head (budget 1.5%) + tail (every 100th key) by measurement: on Qwen2.5-Coder-0.5B at 16k / 32k, KL 0.0049
    # / 0.0031 at 2.89% / 2.69% of the keys, against the top 2% alone's 0.0115 / 0.0128 at 2.40% / 2.20%
    tail_stride: int = knob(100, "`topk`/`oracle`: also attend every `tail_stride`-th offloaded key that the head "
                            "does not hold, weighted by `tail_stride`: a systematic sample from an offset drawn per "
                            "step and site (the same when a step is recomputed; shared by the site's kv heads and "
                            "query rows), so the head is counted exactly and the rest estimated without bias. "
                            "`0`: the head alone.", lo=0, runtime=True)
    retriever: str = knob("auto", "The index of the offloaded keys. `'sketch'`: an int4 (or int8) code of every "
                          "centred offloaded key, scanned each step; `topk` attends the `budget` best. "
                          "`'rotated'`: the same int4 scan over a code of each key turned by a seeded random "
                          "rotation, each dimension first measured in a unit fitted to the prompt's queries "
                          "(the keys are coded at the first decode step); finds more of the heavy keys for the "
                          "same bytes. `'lsh'`: SimHash bucket tables (`lsh_k` "
                          "bits x `lsh_l` tables), `sample`'s retrieval; `topk` takes the best of its "
                          "candidates. `'auto'`: the sketch for `topk`, LSH for `sample`.",
                          kind="custom", check=_retriever_error, runtime=True, choices=RETRIEVERS,
                          span="'sketch'/'rotated' not with estimator 'sample'; 'rotated' with sketch_bits 4")
    # int4 by measurement: on Qwen2.5-Coder-0.5B at 16k/32k, KL 0.0115/0.0061 vs int8's 0.0108/0.0058 at the
    # same keys, for half the bytes scanned (docs/quality.md)
    sketch_bits: int = knob(4, "The sketch's code width per key dimension: `4` (int4, two codes a byte) or `8` "
                            "(int8: twice the bytes scanned each step, ranks a little closer to q.k).",
                            kind="choice", choices=SKETCH_BITS, runtime=True)
    lsh_k: int = knob(10, "SimHash bits per LSH table.", lo=1, hi=16, runtime=True)
    lsh_l: int = knob(150, "LSH tables.", lo=1, hi=65535, runtime=True)
    lsh_threshold: int = knob(2, "Collisions (of the `lsh_l` tables) that retrieve a key.", kind="custom",
                              check=_threshold_error, runtime=True, span="int in [1, min(lsh_l, 255)]")
    seed: int = knob(0, "Seeds the SimHash projections (one per site, shared by its kv heads) and the tail "
                        "sample's offsets (one per step and site).", lo=0, hi=2**62, runtime=True)
    dense_layers: tuple[int, ...] = knob((), "Layer indices left dense: the model keeps their cache and attention.",
                                         kind="custom", check=_layers_error, span="a list of layer indices")
    cpu_threads: int | None = knob(None, "OpenMP threads of the CPU kernel. `None`: torch's setting, one fewer when "
                                   "the model runs on an accelerator (that core drives the device). torch's own "
                                   "setting is never changed.", lo=1, optional=True)
    on_unmatched: str = knob("fallback", "An attention site kvpass cannot rewrite: `'fallback'` leaves it dense and "
                             "reports why (`kvpass.explain`); `'error'` raises naming the site and the reason.",
                             kind="choice", choices=("fallback", "error"))
    inductor: bool = knob(True, "Compile the rewritten graph with Inductor; `False` runs it eagerly.", kind="bool")
    static_backend: str = knob("auto", "The static part (sinks + window) on the device: `'triton'` (the Triton "
                               "kernel), `'torch'` (the reference), `'auto'` (Triton on CUDA, else torch; on a "
                               "CPU store the static slots are folded into the C++ pass).", kind="choice",
                               choices=("auto", "triton", "torch"), runtime=True)
    overlap: bool = knob(True, "CUDA only: the CPU part runs while the device computes the static part (a copy "
                         "stream, pinned buffers); `False`: one after the other.", kind="bool", runtime=True)
    dryrun: bool = knob(False, "Report only: run the original graph unchanged (what `kvpass.explain` does).",
                        kind="bool")
    host_block_size: int = knob(4096, "Tokens per block of the host store.", lo=1, runtime=True)
    onnx_lsh: str = knob("portable", "ONNX export of the host part: `'portable'` (standard ONNX ops, any "
                         "onnxruntime, dense cost) or `'custom'` (one `kvpass.DecodeStep` node per layer, computed by "
                         "kvpass's onnxruntime op library at sparse cost; float32 models).", kind="choice",
                         choices=("portable", "custom"))

    def __post_init__(self):
        if not isinstance(self.dense_layers, tuple):  # any iterable of layer indices, kept sorted
            try:
                object.__setattr__(self, "dense_layers", tuple(sorted(int(i) for i in self.dense_layers)))
            except (TypeError, ValueError) as e:
                raise ValueError(f"kvpass: dense_layers must be a list of layer indices, got "
                                 f"{self.dense_layers!r}") from e
        for f in dataclasses.fields(self):
            if (err := f.metadata["knob"].error(f.name, getattr(self, f.name), self)) is not None:
                raise ValueError(f"kvpass: {err}")

    @property
    def index(self) -> str:
        """The index a store keeps, "sketch", "rotated" or "lsh" (``retriever``, with "auto" resolved)."""
        if self.retriever != "auto":
            return self.retriever
        return "sketch" if self.estimator == "topk" else "lsh"

    @classmethod
    def knob(cls, name: str) -> Knob:
        """The declaration of one option (its range, choices, doc)."""
        return cls.__dataclass_fields__[name].metadata["knob"]

    def to_op_string(self) -> str:
        """The runtime knobs as the string the ops of a compiled graph carry (a graph constant)."""
        return json.dumps({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                           if f.metadata["knob"].runtime}, sort_keys=True)

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def from_op_string(text: str) -> Options:
        return Options(**json.loads(text))


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Options))

# Named configurations (``options={"preset": NAME, ...}``; keys given beside the preset override it), each
# with what it is (the options reference prints it).
PRESET_DOCS: dict[str, str] = {
    "magicpig": "The MagicPIG paper's configuration (Chen et al., ICLR 2025): LSH importance sampling, K = 10 "
                "bits x L = 150 SimHash tables, a key retrieved when it collides in >= 2 tables, each retrieved "
                "key weighted by 1 / P(retrieved); 4 sinks + 64 window tokens on the device; no tail sample.",
}
PRESETS: dict[str, dict[str, Any]] = {
    "magicpig": {"estimator": "sample", "retriever": "lsh", "lsh_k": 10, "lsh_l": 150, "lsh_threshold": 2, "sink_size": 4,
                 "window_size": 64, "tail_stride": 0},
}


def parse_options(options: dict[str, Any] | Options | None = None, mode: str | None = None,
                  **overrides) -> Options:
    """A user's ``options`` (dict, ``Options`` or None) plus keyword overrides, validated once.  A "preset"
    key names a configuration of ``PRESETS``, under the other keys.  Unknown keys and bad values raise
    ``ValueError`` naming what was expected."""
    if mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise ValueError(f"kvpass: unknown mode={mode!r}; kvpass accepts torch.compile's modes")
    if isinstance(options, Options) and not overrides:
        return options
    given = dataclasses.asdict(options) if isinstance(options, Options) else dict(options or {})
    given.update(overrides)
    if "preset" in given:
        name = given.pop("preset")
        if name not in PRESETS:
            raise ValueError(f"kvpass: unknown preset {name!r}; presets are {sorted(PRESETS)}")
        given = {**PRESETS[name], **given}
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"kvpass: unknown option(s) {unknown}; valid options are {sorted(OPTION_NAMES)} "
                         f"(and 'preset', one of {sorted(PRESETS)})")
    return Options(**given)


def options_reference() -> str:
    """The options reference in Markdown, made from the declarations above: ``kvpass options`` prints it and
    ``docs/options.md`` is it (a test holds the two equal)."""
    defaults = Options()
    intro = ("Every knob kvpass takes, from its one declaration (`kvpass.Options` in `runtime/config.py`). Pass "
             "them as `torch.compile(model, backend=\"kvpass\", options={...})`, to `kvpass.KVStore(...)`, to "
             "`kvpass.export_onnx(..., options=...)`, or as the CLI's flags. Each is validated once where it "
             "comes in: an unknown key raises `ValueError` listing the valid ones, a bad value one naming the "
             "accepted range. `Options.knob(name)` returns a knob's declaration.")
    lines = ["# Options", "", intro, "",
             "This page is generated: `kvpass options > docs/options.md` (a test fails when the two disagree).",
             "", "| option | type | default | accepted |", "|---|---|---|---|"]
    for f in dataclasses.fields(Options):
        k = f.metadata["knob"]
        typ = f.type.replace("|", "\\|")  # a pipe inside a table cell must be escaped, even in code
        lines.append(f"| [`{f.name}`](#{f.name}) | `{typ}` | `{getattr(defaults, f.name)!r}` | {k.accepted()} |")
    lines += ["", "## What each does", ""]
    for f in dataclasses.fields(Options):
        k = f.metadata["knob"]
        summary = f"`{f.type}`, default `{getattr(defaults, f.name)!r}`; {k.accepted()}."
        lines += [f"### `{f.name}`", "", summary, "", k.doc, ""]
    presets = ("`options={\"preset\": NAME, ...}` starts from a named configuration; the other keys given override "
               "it (`kvpass generate --preset NAME`).")
    lines += ["## Presets", "", presets, ""]
    for name, values in PRESETS.items():
        lines += [f"### `{name}`", "", PRESET_DOCS[name], "", "| option | value |", "|---|---|"]
        lines += [f"| `{key}` | `{val!r}` |" for key, val in values.items()]
        lines.append("")
    return "\n".join(lines)
