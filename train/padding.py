"""Padded batch arrays as tensors: the mask over each row's real tokens, and the float32 upcast of a batch
for readers that take it as it is."""

from __future__ import annotations

import numpy as np
import torch

# Below this many elements torch runs an elementwise op in the calling thread (ATen's GRAIN_SIZE).
_SERIAL_ELEMENTS = 32768


def as_float32(array: np.ndarray) -> torch.Tensor:
    """``array`` (float16 or float32) as a float32 tensor, cast by torch's vectorised code in pieces small
    enough that each runs in this thread: numpy's float16 cast is scalar code (~1 GB/s here, the largest
    cost of a batch before), and one whole-batch torch cast would start a second OpenMP team in the collate
    thread, competing with the training step's threads for the same cores."""
    source = torch.from_numpy(array)
    if source.dtype == torch.float32:
        return source
    out = torch.empty(source.shape, dtype=torch.float32)
    flat_in, flat_out = source.reshape(-1, source.shape[-1]), out.view(-1, source.shape[-1])
    step = max(1, _SERIAL_ELEMENTS // max(1, source.shape[-1]))
    for start in range(0, flat_in.shape[0], step):
        flat_out[start : start + step].copy_(flat_in[start : start + step])
    return out


def padding_mask(lengths: list[int] | np.ndarray) -> torch.Tensor:
    """[B, max(lengths)] bool, True on each row's first ``lengths[i]`` (real) tokens."""
    lengths = torch.as_tensor(np.asarray(lengths, dtype=np.int64))
    return torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
