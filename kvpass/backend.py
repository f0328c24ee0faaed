"""The ``torch.compile`` backend: ``torch.compile(fn, backend="kvpass", options={...})``.

Found through the ``torch_dynamo_backends`` entry point, so no ``import kvpass`` is needed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx

from kvpass.passes import run_pass
from kvpass.report import Report
from kvpass.runtime.config import Options, parse_options
from kvpass.runtime.registry import REGISTRY

log = logging.getLogger("kvpass")

_advised: set[str] = set()  # the "nothing rewritten" warnings already given
_reports = threading.local()  # set by kvpass.explain to collect what each compiled graph did


def _collector() -> list[Report] | None:
    return getattr(_reports, "active", None)


@contextlib.contextmanager
def collect_reports() -> Iterator[list[Report]]:
    """Within the block, every graph the kvpass backend compiles (on this thread) appends its Report
    to the yielded list."""
    reports: list[Report] = []
    _reports.active = reports
    try:
        yield reports
    finally:
        _reports.active = None


def kvpass_backend(gm: fx.GraphModule, example_inputs: list[Any], mode: str | None = None,
                   options: dict[str, Any] | Options | None = None):
    """Rewrite every attention site of a Dynamo graph into kvpass's split attention, then compile the
    graph with Inductor (``options={"inductor": False}`` runs it eagerly)."""
    opts = parse_options(options, mode)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
    report = run_pass(gm, opts, needs_grad)
    log.info("%s", report)
    if report.rewritten and not opts.dryrun:
        # Dynamo's compile keeps the call's arguments (the user's cache among them) in reference cycles:
        # collect them once, when the next sequence starts, so a finished sequence's stores do not outlive it
        REGISTRY.collect_pending = True
    if (advice := report.advice()) is not None and advice not in _advised and not opts.dryrun:
        _advised.add(advice)  # once per process: a model compiles several graphs
        log.warning("%s", advice)
    if (collected := _collector()) is not None:
        collected.append(report)
    if opts.dryrun or not opts.inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)
