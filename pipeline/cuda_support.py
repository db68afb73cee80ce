"""What this machine's CUDA can do, the rules training and extraction share: which 16-bit float a card
computes natively, and why torch sees no GPU.

``torch.cuda.is_bf16_supported()`` also answers True where bf16 is only emulated (Turing, e.g. a T4,
compute capability 7.5): there bf16 runs without tensor cores, several times slower than fp16. So the
rule is the compute capability itself: bf16 tensor cores arrived with Ampere (8.0).

torch is imported inside the functions: the CLI imports this module without starting torch.
"""

from __future__ import annotations

import functools
from typing import Any

from unipt.pipeline.log import log

NATIVE_BF16_CAPABILITY = (8, 0)


def native_bf16(device: Any) -> bool:
    """Whether the CUDA ``device`` has bf16 tensor cores (compute capability >= 8.0)."""
    import torch

    return tuple(torch.cuda.get_device_capability(device)) >= NATIVE_BF16_CAPABILITY


def fast_half(device: Any) -> str:
    """The 16-bit dtype to compute in on the CUDA ``device``: ``bfloat16`` where native, else ``float16``."""
    return "bfloat16" if native_bf16(device) else "float16"


def warn_if_emulated_bf16(setting_name: str, device: Any) -> None:
    """One warning (per setting and device, per process) when a config asks for bf16 on a CUDA card that
    only emulates it."""
    if not native_bf16(device):
        _warn_emulated_bf16(setting_name, str(device))


@functools.cache
def _warn_emulated_bf16(setting_name: str, device: str) -> None:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    log.warning(
        f"warning: {setting_name} is bfloat16 but {torch.cuda.get_device_name(device)} (compute capability "
        f"{major}.{minor}) has no bf16 tensor cores, so it runs emulated and slowly; use float16 on this card"
    )


def no_cuda_cause() -> str:
    """Why ``torch.cuda.is_available()`` is False, for a CPU fallback's reason and a worker's refusal."""
    import os

    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "CUDA_VISIBLE_DEVICES hides every GPU"
    return (
        f"torch is built for CUDA {torch.version.cuda} but finds no usable device "
        "(no NVIDIA GPU here, or a driver too old for that CUDA)"
    )
