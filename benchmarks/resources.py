"""Peak memory of this process, for benchmarks that compare training setups."""

from __future__ import annotations

import resource
import sys


def peak_rss_mib() -> float:
    """The process's resident-set high-water mark since it started (MiB).

    It never goes down, so compare setups in separate processes, not one after the other.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def peak_cuda_mib() -> float | None:
    """Peak CUDA memory allocated by torch in this process (MiB), or None without CUDA."""
    if "torch" not in sys.modules:
        return None
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20
