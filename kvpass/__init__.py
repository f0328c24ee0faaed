"""kvpass: a torch.compile backend for long-context decoding.

Attention of every decode step is split: the first ``sink_size`` and last ``window_size`` tokens stay on
the model's device; the rest of the KV cache lives in host memory and is attended by a C++/OpenMP CPU
kernel; the two partial results merge exactly through their log-sum-exp.

    model.forward = torch.compile(model.forward, backend="kvpass", options={"window_size": 64})
"""

from __future__ import annotations

from kvpass.api import explain, release, reset, runtime_stats
from kvpass.context import ContextError, load_context, save_context
from kvpass.export import OnnxDecoder, export_onnx, onnx_generate, onnx_session
from kvpass.models import load_default_model, load_model
from kvpass.report import Report, SiteReport
from kvpass.runtime import KVStore, Options

__all__ = [
           "ContextError",
           "KVStore",
           "OnnxDecoder",
           "Options",
           "Report",
           "SiteReport",
           "explain",
           "export_onnx",
           "load_context",
           "load_default_model",
           "load_model",
           "onnx_generate",
           "onnx_session",
           "release",
           "reset",
           "runtime_stats",
           "save_context",
]
__version__ = "0.1.0"
