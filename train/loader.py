"""Stream padded batches out of a ragged activation cache.

Examples are read in *blocks*: runs of consecutive examples whose tokens sit in one
contiguous row range, so a block costs one sequential read per layer. Training shuffles the
block order and then examples within a window of blocks (a shuffle buffer); a background
thread reads the next blocks while the model computes. Only the requested layers are read.

A feature-map cache (CNN stages) comes out as maps: each stage is ``[B, C, H, W]``, read through
that stage's own offsets, since its H*W rows per image differ from every other stage's.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from pipeline.cache import ActivationCache
from pipeline.config import TrainConfig
from pipeline.errors import UniptError

T = TypeVar("T")  # what a block read gives per example


@dataclass
class Batch:
    # One float32 tensor per requested layer: [B, N, D_l] zero-padded tokens, or [B, C_l, H_l, W_l] maps.
    hidden: list[torch.Tensor]
    mask: torch.Tensor  # [B, N] bool, True on real tokens; for maps all True over the last layer's H*W
    labels: torch.Tensor  # [B] int64
    indices: np.ndarray  # example indices in the cache


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
        self.grids = {layer: reader.layer_spec(layer).grid for layer in self.layers}
        self.maps = all(grid is not None for grid in self.grids.values())
        if not self.maps and any(grid is not None for grid in self.grids.values()):
            raise UniptError(
                f"layers {self.layers} of cache {reader.source} mix feature maps and token sequences; "
                "read them separately"
            )
        self.offsets = {layer: reader.offsets_for(layer) for layer in self.layers}
        distinct = list({id(o): o for o in self.offsets.values()}.values())  # token layers share one
        self.blocks = plan_blocks(self.indices, distinct, block_examples)

    @classmethod
    def for_split(
        cls,
        reader: ActivationCache,
        split: str,
        config: TrainConfig,
        seed: int,
        shuffle: bool,
        layers: list[int] | None = None,
    ) -> CacheBatches:
        """One split's batches as training reads them: batch size, block plan and shuffle from ``config``.

        ``layers`` defaults to every layer of the cache.
        """
        return cls(
            reader,
            split,
            reader.layers if layers is None else layers,
            config.batch_size,
            shuffle=shuffle,
            seed=seed,
            block_examples=config.block_examples,
            shuffle_buffer_blocks=config.shuffle_buffer_blocks,
        )

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        order = epoch_order(
            self.blocks,
            self._read_block,
            self.batch_size,
            self.shuffle,
            seed=self.seed,
            epoch=epoch,
            shuffle_buffer_blocks=self.shuffle_buffer_blocks,
            prefetch_blocks=self.prefetch_blocks,
        )
        for examples in order:
            yield self._collate(examples)

    def _read_block(self, indices: np.ndarray) -> list[dict[int, np.ndarray]]:
        tokens = {}
        for layer in self.layers:
            offsets, grid = self.offsets[layer], self.grids[layer]
            starts, stops = offsets[indices, 0], offsets[indices, 1]
            base, end = int(starts[0]), int(stops[-1])
            rows = self.reader.read_rows(layer, base, end)
            pieces = [rows[s - base : e - base] for s, e in zip(starts, stops, strict=True)]
            tokens[layer] = [p.reshape(grid[0], grid[1], -1) for p in pieces] if grid else pieces
        return [{layer: tokens[layer][i] for layer in self.layers} for i in range(len(indices))]

    def _collate(self, examples: list[tuple[int, dict[int, np.ndarray]]]) -> Batch:
        if self.maps:
            return self._collate_maps(examples)
        lengths = [ex[1][self.layers[0]].shape[0] for ex in examples]
        longest = max(lengths)
        hidden = []
        for layer in self.layers:
            width = examples[0][1][layer].shape[1]
            padded = np.zeros((len(examples), longest, width), dtype=np.float32)
            for row, (_, tokens) in enumerate(examples):
                padded[row, : lengths[row]] = tokens[layer]
            hidden.append(torch.from_numpy(padded))
        mask = padding_mask(lengths)
        indices = np.array([ex[0] for ex in examples], dtype=np.int64)
        return Batch(hidden=hidden, mask=mask, labels=torch.from_numpy(self.labels[indices]), indices=indices)

    def _collate_maps(self, examples: list[tuple[int, dict[int, np.ndarray]]]) -> Batch:
        hidden = []
        for layer in self.layers:
            stacked = np.stack([maps[layer] for _, maps in examples]).astype(np.float32, copy=False)
            hidden.append(torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous())  # [B, C, H, W]
        h, w = self.grids[self.layers[-1]]
        mask = torch.ones(len(examples), h * w, dtype=torch.bool)
        indices = np.array([ex[0] for ex in examples], dtype=np.int64)
        return Batch(hidden=hidden, mask=mask, labels=torch.from_numpy(self.labels[indices]), indices=indices)


def plan_blocks(indices: np.ndarray, offsets: list[np.ndarray], block_examples: int) -> list[np.ndarray]:
    """Cut sorted example indices into runs whose rows are back to back in every one of ``offsets``
    (one ``[n_examples, 2]`` start/stop array per layer, of one cache or several), at most
    ``block_examples`` long.

    The seeded shuffles depend only on the block sizes, so anything that must see examples in the
    same order as a :class:`CacheBatches` (a paired cache, an online baseline) uses this plan.
    """
    if len(indices) == 0:
        return []
    apart = np.diff(indices) != 1
    for layer_offsets in offsets:
        starts, stops = layer_offsets[indices, 0], layer_offsets[indices, 1]
        apart |= starts[1:] != stops[:-1]
    breaks = np.flatnonzero(apart) + 1
    blocks = []
    for run in np.split(indices, breaks):
        blocks += [run[i : i + block_examples] for i in range(0, len(run), block_examples)]
    return blocks


def epoch_order(
    blocks: list[np.ndarray],
    read: Callable[[np.ndarray], list[T]],
    batch_size: int,
    shuffle: bool,
    *,
    seed: int,
    epoch: int,
    shuffle_buffer_blocks: int,
    prefetch_blocks: int,
) -> Iterator[list[tuple[int, T]]]:
    """One epoch's batches of ``(example index, item)``, ``read(block)`` giving one item per example.

    Shuffling permutes the block order, then examples within each window of ``shuffle_buffer_blocks``
    blocks, all from one generator seeded by ``(seed, epoch)``: the order depends on the block sizes
    only, never on the items, so anything holding the same block plan (a cache, an online baseline)
    sees the same batches. ``read`` runs in a background thread, ``prefetch_blocks`` blocks ahead (0: in
    the caller's thread, for reads too cheap to be worth one).
    """
    rng = np.random.default_rng([seed, epoch]) if shuffle else None
    order = rng.permutation(len(blocks)) if rng is not None else np.arange(len(blocks))
    items = ((blocks[i], read(blocks[i])) for i in order)
    if prefetch_blocks > 0:
        items = _prefetch(items, prefetch_blocks)
    window = shuffle_buffer_blocks if shuffle else 1
    pending: list[tuple[int, T]] = []
    buffered: list[tuple[np.ndarray, list[T]]] = []
    for block in items:
        buffered.append(block)
        if len(buffered) < window:
            continue
        pending += _examples_of(buffered, rng)
        buffered = []
        while len(pending) >= batch_size:
            yield pending[:batch_size]
            pending = pending[batch_size:]
    if buffered:
        pending += _examples_of(buffered, rng)
    for start in range(0, len(pending), batch_size):
        yield pending[start : start + batch_size]


def padding_mask(lengths: list[int] | np.ndarray) -> torch.Tensor:
    """[B, max(lengths)] bool, True on each row's first ``lengths[i]`` (real) tokens."""
    lengths = torch.as_tensor(np.asarray(lengths, dtype=np.int64))
    return torch.arange(int(lengths.max()))[None, :] < lengths[:, None]


def _examples_of(
    blocks: list[tuple[np.ndarray, list[T]]], rng: np.random.Generator | None
) -> list[tuple[int, T]]:
    examples = [
        (int(index), item) for indices, items in blocks for index, item in zip(indices, items, strict=True)
    ]
    if rng is not None:
        examples = [examples[i] for i in rng.permutation(len(examples))]
    return examples


def _prefetch(source: Iterator[T], depth: int) -> Iterator[T]:
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
