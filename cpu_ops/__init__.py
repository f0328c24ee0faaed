"""C++17/OpenMP kernels for the offloaded half of attention, and the one loader that builds them.

``load()`` builds ``csrc/*.cpp`` with ``torch.utils.cpp_extension`` on first use (cached afterwards) and
registers the ``kvpass_cpu::*`` ops.  Nothing here knows about FX or the KV store.
"""

from kvpass.cpu_ops.loader import (
    load,
    log_retrieval_probability,
    lsh_attention,
    lsh_build_segment,
    lsh_merge_segments,
    sign_codes,
    simd_level,
)
from kvpass.cpu_ops.ort_library import ort_library_path

__all__ = ["load", "log_retrieval_probability", "lsh_attention",
           "lsh_build_segment", "lsh_merge_segments", "ort_library_path", "sign_codes", "simd_level"]
