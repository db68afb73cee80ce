"""Stream padded batches out of a ragged activation cache.

Examples are read in *blocks*: runs of consecutive examples whose tokens sit in one
contiguous row range, so a block costs one sequential read per layer. Training shuffles the
block order and then examples within a window of blocks (a shuffle buffer); a background
thread reads the next blocks while the model computes. Only the requested layers are read.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.cache import ActivationCache


@dataclass
class Batch:
    hidden: list[torch.Tensor]  # one [B, N, D_l] float32 tensor per requested layer, zero-padded
    mask: torch.Tensor  # [B, N] bool, True on real tokens
    labels: torch.Tensor  # [B] int64
    indices: np.ndarray  # example indices in the cache


@dataclass
class _Block:
    indices: np.ndarray
    tokens: dict[int, list[np.ndarray]]  # layer -> one [len_i, D] array per example


class CacheBatches:
    """Batches of one split of a cache; iterate ``epoch(n)`` once per epoch."""

    def __init__(
        self,
        reader: ActivationCache,
        split: str,
        layers: list[int],
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        block_examples: int = 256,
        shuffle_buffer_blocks: int = 4,
        prefetch_blocks: int = 4,
    ) -> None:
        self.reader = reader
        self.layers = list(layers)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer_blocks = shuffle_buffer_blocks
        self.prefetch_blocks = prefetch_blocks
        self.indices = reader.split_indices(split)
        self.labels = reader.labels()
        self.blocks = _contiguous_blocks(self.indices, reader.offsets, block_examples)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.blocks)) if self.shuffle else np.arange(len(self.blocks))
        blocks = _prefetch((self._read_block(self.blocks[i]) for i in order), self.prefetch_blocks)
        window = self.shuffle_buffer_blocks if self.shuffle else 1
        pending: list[tuple[int, dict[int, np.ndarray]]] = []
        buffered: list[_Block] = []
        for block in blocks:
            buffered.append(block)
            if len(buffered) < window:
                continue
            pending += _examples_of(buffered, rng if self.shuffle else None)
            buffered = []
            while len(pending) >= self.batch_size:
                yield self._collate(pending[: self.batch_size])
                pending = pending[self.batch_size :]
        if buffered:
            pending += _examples_of(buffered, rng if self.shuffle else None)
        for start in range(0, len(pending), self.batch_size):
            yield self._collate(pending[start : start + self.batch_size])

    def _read_block(self, indices: np.ndarray) -> _Block:
        starts, stops = self.reader.offsets[indices, 0], self.reader.offsets[indices, 1]
        base, end = int(starts[0]), int(stops[-1])
        tokens = {}
        for layer in self.layers:
            rows = self.reader.read_rows(layer, base, end)
            tokens[layer] = [rows[s - base : e - base] for s, e in zip(starts, stops, strict=True)]
        return _Block(indices=indices, tokens=tokens)

    def _collate(self, examples: list[tuple[int, dict[int, np.ndarray]]]) -> Batch:
        lengths = [ex[1][self.layers[0]].shape[0] for ex in examples]
        longest = max(lengths)
        hidden = []
        for layer in self.layers:
            width = examples[0][1][layer].shape[1]
            padded = np.zeros((len(examples), longest, width), dtype=np.float32)
            for row, (_, tokens) in enumerate(examples):
                padded[row, : lengths[row]] = tokens[layer]
            hidden.append(torch.from_numpy(padded))
        mask = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
        indices = np.array([ex[0] for ex in examples], dtype=np.int64)
        return Batch(hidden=hidden, mask=mask, labels=torch.from_numpy(self.labels[indices]), indices=indices)


def _contiguous_blocks(indices: np.ndarray, offsets: np.ndarray, block_examples: int) -> list[np.ndarray]:
    """Cut sorted example indices into runs whose rows are back to back, at most block_examples long."""
    if len(indices) == 0:
        return []
    starts, stops = offsets[indices, 0], offsets[indices, 1]
    breaks = np.flatnonzero((starts[1:] != stops[:-1]) | (np.diff(indices) != 1)) + 1
    blocks = []
    for run in np.split(indices, breaks):
        blocks += [run[i : i + block_examples] for i in range(0, len(run), block_examples)]
    return blocks


def _examples_of(blocks: list[_Block], rng: np.random.Generator | None) -> list[tuple[int, dict]]:
    examples = [
        (int(index), {layer: block.tokens[layer][i] for layer in block.tokens})
        for block in blocks
        for i, index in enumerate(block.indices)
    ]
    if rng is not None:
        examples = [examples[i] for i in rng.permutation(len(examples))]
    return examples


def _prefetch(source: Iterator[_Block], depth: int) -> Iterator[_Block]:
    """Run ``source`` in a background thread, ``depth`` items ahead (Zarr decodes off the GIL)."""
    items: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in source:
                if stop.is_set():
                    return
                items.put(item)
        except BaseException as exc:  # handed to the consumer, re-raised there
            items.put(exc)
        items.put(done)

    thread = threading.Thread(target=produce, daemon=True, name="cache-prefetch")
    thread.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
