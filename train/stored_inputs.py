"""A Linear layer that reads the cache's 16-bit rows directly, for the first layer a cached activation meets.

Training batches keep fp16/bf16 rows as stored (:mod:`unipt.train.loader`). Upcasting them before the model
would make a float32 copy of every layer, and autograd would keep those copies until the backward pass
(a Linear saves its input to compute its weight's gradient): for BERT-large shapes, 25 layers x 1024
values per token, that copy is the largest tensor of a training step. :class:`StoredInputLinear` upcasts
inside the matmul's call and saves the 16-bit input instead, upcasting it again in the backward pass:
the same float32 arithmetic (each output row is ``nn.Linear``'s; the weight's gradient is summed over
pieces of rows), half the bytes held between the passes, and no float32 copy of a layer: on the CPU the
upcast goes in pieces of about 1 MB.

Models that use it for every cached input set ``takes_stored_dtype = True``; the training loop then hands
them the batch without the upfront upcast (:func:`unipt.train.loader.to_device`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# On the CPU the upcast goes in pieces of at most this many bytes: a whole layer's float32 copy (8 MB for a
# batch of BERT-large rows) is above glibc's mmap threshold, so each step would map, fault in and unmap it,
# or keep it in a heap that grows; pieces this small are reused from the heap step after step.
_CPU_PIECE_BYTES = 1 << 20


def _pieces(rows: int, width: int, device: torch.device) -> list[slice]:
    if device.type != "cpu":
        return [slice(0, rows)]
    step = max(1, _CPU_PIECE_BYTES // (4 * width))
    return [slice(start, start + step) for start in range(0, rows, step)]


class _LinearOnStoredInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, stored: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(stored, weight)
        ctx.has_bias = bias is not None
        flat = stored.reshape(-1, stored.shape[-1])
        pieces = _pieces(len(flat), flat.shape[1], flat.device)
        if len(pieces) == 1:
            return F.linear(stored.to(weight.dtype), weight, bias)
        out = torch.empty(len(flat), weight.shape[0], dtype=weight.dtype, device=weight.device)
        for piece in pieces:
            out[piece] = F.linear(flat[piece].to(weight.dtype), weight, bias)
        return out.reshape(*stored.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None]:
        stored, weight = ctx.saved_tensors
        flat_grad = grad.reshape(-1, grad.shape[-1])
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            flat = stored.reshape(-1, stored.shape[-1])
            grad_weight = torch.zeros(weight.shape, dtype=flat_grad.dtype, device=flat_grad.device)
            for piece in _pieces(len(flat), flat.shape[1], flat.device):
                grad_weight.addmm_(flat_grad[piece].t(), flat[piece].to(flat_grad.dtype))
            grad_weight = grad_weight.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0).to(weight.dtype)
        return None, grad_weight, grad_bias  # the cached rows are constants: no gradient for them


class StoredInputLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) that also takes 16-bit inputs which need no
    gradient, keeping them 16-bit between the forward and backward passes."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype or x.requires_grad or not torch.is_grad_enabled():
            return super().forward(x.to(self.weight.dtype))
        return _LinearOnStoredInput.apply(x, self.weight, self.bias)
