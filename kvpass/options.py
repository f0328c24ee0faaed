"""The knobs of the kvpass backend: ``torch.compile(..., backend="kvpass", options={...})``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

ESTIMATORS = ("exact", "none")
PLANNED_ESTIMATORS = ("sample", "topk", "oracle")  # the LSH index is a later milestone


@dataclass(frozen=True)
class Options:
    sink_size: int = 4              # first tokens kept on the device (attention sinks)
    window_size: int = 64           # most recent tokens kept on the device
    estimator: str = "exact"        # how the offloaded part is attended: "exact" | "none" (static only)
    dense_layers: tuple[int, ...] = ()  # layer indices left dense (the model keeps their cache)
    cpu_threads: int | None = None  # OpenMP threads of the CPU kernel (None: torch's setting)
    on_unmatched: str = "fallback"  # a site kvpass cannot rewrite: "fallback" (dense, reported) | "error"
    inductor: bool = True           # compile the rewritten graph with Inductor (False: run it eagerly)
    dryrun: bool = False            # report only: run the original graph unchanged
    host_block_size: int = 4096     # tokens per host-store block
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def key(self) -> str:
        """A stable string naming the runtime-relevant knobs (passed to the custom ops)."""
        return json.dumps({"sink_size": self.sink_size, "window_size": self.window_size,
                           "host_block_size": self.host_block_size}, sort_keys=True)


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
    if opts.estimator in PLANNED_ESTIMATORS:
        raise ValueError(f"kvpass: estimator={opts.estimator!r} needs the LSH index, which is not built yet; "
                         f"available: {list(ESTIMATORS)}")
    if opts.estimator not in ESTIMATORS:
        raise ValueError(f"kvpass: estimator must be one of {list(ESTIMATORS)}, got {opts.estimator!r}")
    if opts.on_unmatched not in ("fallback", "error"):
        raise ValueError(f"kvpass: on_unmatched must be 'fallback' or 'error', got {opts.on_unmatched!r}")
    if opts.cpu_threads is not None and (not isinstance(opts.cpu_threads, int) or opts.cpu_threads < 1):
        raise ValueError(f"kvpass: cpu_threads must be a positive int or None, got {opts.cpu_threads!r}")
    return opts
