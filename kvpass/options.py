"""The knobs of the kvpass backend: ``torch.compile(..., backend="kvpass", options={...})``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

ESTIMATORS = ("sample", "topk", "oracle", "exact", "none")


@dataclass(frozen=True)
class Options:
    sink_size: int = 4              # first tokens kept on the device (attention sinks)
    window_size: int = 64           # most recent tokens kept on the device
    estimator: str = "sample"       # offloaded part: "sample" (LSH importance sampling) | "topk" (best
                                    # `budget` of the LSH candidates) | "oracle" (best `budget` of all)
                                    # | "exact" (all: equals dense) | "none" (static part only)
    budget: float | int = 0.02      # topk/oracle: a fraction of the offloaded keys (float) or a count (int)
    lsh_k: int = 10                 # SimHash bits per table
    lsh_l: int = 150                # SimHash tables
    lsh_threshold: int = 2          # collisions (of lsh_l tables) that retrieve a key
    seed: int = 0                   # seeds the SimHash projections (one per site and kv head)
    dense_layers: tuple[int, ...] = ()  # layer indices left dense (the model keeps their cache)
    cpu_threads: int | None = None  # OpenMP threads of the CPU kernel (None: torch's setting)
    on_unmatched: str = "fallback"  # a site kvpass cannot rewrite: "fallback" (dense, reported) | "error"
    inductor: bool = True           # compile the rewritten graph with Inductor (False: run it eagerly)
    static_backend: str = "auto"    # static part: "triton" (GPU kernel) | "torch" | "auto" (triton on CUDA)
    overlap: bool = True            # CUDA: CPU part concurrent with the device's static part (copy stream,
                                    # pinned buffers); False: one after the other
    dryrun: bool = False            # report only: run the original graph unchanged
    host_block_size: int = 4096     # tokens per host-store block
    onnx_lsh: str = "portable"      # ONNX export of the host part: "portable" (standard ONNX ops) |
                                    # "custom" (a kvpass-domain op + onnxruntime custom-op library)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def key(self) -> str:
        """A stable string naming the runtime-relevant knobs (passed to the custom ops)."""
        return json.dumps({"sink_size": self.sink_size, "window_size": self.window_size,
                           "host_block_size": self.host_block_size, "lsh_k": self.lsh_k, "lsh_l": self.lsh_l,
                           "lsh_threshold": self.lsh_threshold, "seed": self.seed, "budget": self.budget,
                           "static_backend": self.static_backend, "overlap": self.overlap},
                          sort_keys=True)


_FIELDS = {f.name for f in dataclasses.fields(Options)} - {"extra"}


def parse_options(options: dict[str, Any] | Options | None, mode: str | None = None) -> Options:
    """Validate a user's ``options`` dict.  Unknown keys and bad values raise ``ValueError``."""
    if isinstance(options, Options):
        return options
    options = dict(options or {})
    unknown = sorted(set(options) - _FIELDS)
    if unknown:
        raise ValueError(f"kvpass: unknown option(s) {unknown}; valid options are {sorted(_FIELDS)}")
    if mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise ValueError(f"kvpass: unknown mode={mode!r}; kvpass accepts torch.compile's modes")
    if "dense_layers" in options:
        try:
            options["dense_layers"] = tuple(sorted(int(i) for i in options["dense_layers"]))
        except TypeError as e:
            raise ValueError(f"kvpass: dense_layers must be a list of layer indices, got "
                             f"{options['dense_layers']!r}") from e
    opts = Options(**options)
    for name in ("sink_size", "window_size", "host_block_size"):
        val = getattr(opts, name)
        if not isinstance(val, int) or isinstance(val, bool) or val < (0 if name == "sink_size" else 1):
            raise ValueError(f"kvpass: {name} must be an int >= {0 if name == 'sink_size' else 1}, got {val!r}")
    for name, lo, hi in (("lsh_k", 1, 16), ("lsh_l", 1, 65535), ("seed", 0, 2**62)):
        val = getattr(opts, name)
        if not isinstance(val, int) or isinstance(val, bool) or not lo <= val <= hi:
            raise ValueError(f"kvpass: {name} must be an int in [{lo}, {hi}], got {val!r}")
    if not isinstance(opts.lsh_threshold, int) or not 1 <= opts.lsh_threshold <= min(opts.lsh_l, 255):
        raise ValueError(f"kvpass: lsh_threshold must be an int in [1, min(lsh_l={opts.lsh_l}, 255)], got "
                         f"{opts.lsh_threshold!r}")
    b = opts.budget
    if isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0 or (isinstance(b, float) and b > 1):
        raise ValueError(f"kvpass: budget must be a fraction in (0, 1] (float) or a token count (int > 0), "
                         f"got {b!r}")
    if opts.estimator not in ESTIMATORS:
        raise ValueError(f"kvpass: estimator must be one of {list(ESTIMATORS)}, got {opts.estimator!r}")
    if opts.static_backend not in ("auto", "triton", "torch"):
        raise ValueError(f"kvpass: static_backend must be 'auto', 'triton' or 'torch', got {opts.static_backend!r}")
    if opts.overlap is not True and opts.overlap is not False:
        raise ValueError(f"kvpass: overlap must be True or False, got {opts.overlap!r}")
    if opts.onnx_lsh not in ("portable", "custom"):
        raise ValueError(f"kvpass: onnx_lsh must be 'portable' or 'custom', got {opts.onnx_lsh!r}")
    if opts.on_unmatched not in ("fallback", "error"):
        raise ValueError(f"kvpass: on_unmatched must be 'fallback' or 'error', got {opts.on_unmatched!r}")
    if opts.cpu_threads is not None and (not isinstance(opts.cpu_threads, int) or opts.cpu_threads < 1):
        raise ValueError(f"kvpass: cpu_threads must be a positive int or None, got {opts.cpu_threads!r}")
    return opts
