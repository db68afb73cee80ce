"""Batches handed to the training step already on its device: on CUDA the next batch is copied on a side
stream while the current step computes on the default one, so the step never waits for a copy it could
have overlapped.

The streams are a small interface (:class:`Streams`) so the ordering — which copy is queued before which
step, and that every batch is waited for before its step uses it — runs and is tested without a GPU;
:class:`CudaStreams` is the one training uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import Tensor

from unipt.train.fit import EpochData
from unipt.train.loader import Batch

Moved = tuple[list[Tensor], Tensor, Tensor]  # (hidden states, mask, labels) on the device


class Streams(Protocol):
    """Where copies run, and how the compute stream takes over what they made."""

    def copying(self) -> AbstractContextManager:
        """Work queued inside this context runs on the side (copy) stream."""
        ...

    def copied(self) -> Any:
        """A marker of the side stream's work queued so far (a CUDA event)."""
        ...

    def hand_over(self, marker: Any, tensors: list[Tensor]) -> None:
        """The compute stream waits for ``marker``; ``tensors`` are used there from now on."""
        ...


class CudaStreams:
    """A side stream for copies beside the device's current (compute) stream."""

    def __init__(self, device: torch.device) -> None:
        self.side = torch.cuda.Stream(device)
        self.main = torch.cuda.current_stream(device)

    def copying(self) -> AbstractContextManager:
        return torch.cuda.stream(self.side)

    def copied(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def hand_over(self, marker: torch.cuda.Event, tensors: list[Tensor]) -> None:
        self.main.wait_event(marker)
        for tensor in tensors:
            # Made on the side stream: the allocator must not reuse it before the step is done with it.
            tensor.record_stream(self.main)


def pinned_copy(device: torch.device) -> bool:
    """Whether host tensors go to ``device`` through pinned memory without blocking the host: on CUDA
    (a pageable copy waits for the GPU; pinning needs a CUDA build, so nowhere else)."""
    return device.type == "cuda"


def host_to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` on ``device``; on CUDA out of pinned memory and ``non_blocking``."""
    if pinned_copy(device):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class OnDevice:
    """A batch source whose batches arrive on the device, moved by ``move``.

    With ``streams`` (on CUDA: :meth:`for_device`), each batch is moved inside ``streams.copying()`` and
    the next batch's copy is queued before the current batch is handed to the step, so it runs beside
    that step; a batch is handed over only after the compute stream waits for its copy. Without, batches
    are moved as they come.
    """

    def __init__(
        self, source: EpochData, move: Callable[[Batch], Moved], streams: Streams | None = None
    ) -> None:
        self.source, self.move, self.streams = source, move, streams

    @classmethod
    def for_device(cls, source: EpochData, move: Callable[[Batch], Moved], device: torch.device) -> OnDevice:
        return cls(source, move, CudaStreams(device) if device.type == "cuda" else None)

    def __len__(self) -> int:
        return len(self.source)

    def epoch(self, epoch: int = 0) -> Iterator[Moved]:
        streams = self.streams
        if streams is None:
            yield from map(self.move, self.source.epoch(epoch))
            return
        ahead: tuple[Moved, Any] | None = None
        for batch in self.source.epoch(epoch):
            with streams.copying():
                moved = self.move(batch)
                marker = streams.copied()
            if ahead is not None:  # this copy is queued first, so it runs beside the step on ``ahead``
                yield _handed_over(streams, *ahead)
            ahead = moved, marker
        if ahead is not None:
            yield _handed_over(streams, *ahead)


def _handed_over(streams: Streams, moved: Moved, marker: Any) -> Moved:
    hidden, mask, labels = moved
    streams.hand_over(marker, [*hidden, mask, labels])
    return moved
