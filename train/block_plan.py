"""Which examples a loader reads together and in what order: the block plan (runs of examples whose rows sit
back to back, sized to a memory budget) and one epoch's seeded order of batches over it.

Both depend on the split's shape only (example indices, token counts, layer widths), never on the rows, so
anything holding the same plan (a cache's loader, a paired cache, an online baseline) sees the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np

from unipt.train.background import in_background

T = TypeVar("T")  # what a block read gives per example


def blocks_held(prefetch_blocks: int, shuffle_buffer_blocks: int) -> int:
    """Blocks a loader holds at once: the prefetch queue, the shuffle window and the block being read."""
    return prefetch_blocks + shuffle_buffer_blocks + 1


def budgeted_block_examples(
    block_examples: int, values_per_example: float, memory_mb: int | None, blocks_held: int
) -> int:
    """``block_examples``, lowered (to 1 at least) so that ``blocks_held`` blocks of examples holding
    ``values_per_example`` float16 values each fit in ``memory_mb`` MiB; unchanged when ``memory_mb`` is None.

    A pure function of the split's shape, so an online baseline that walks the same examples (same token
    counts, same layer widths) cuts the same blocks and sees the same batches.
    """
    if memory_mb is None or values_per_example <= 0:
        return block_examples
    fits = int(memory_mb * 2**20 // (blocks_held * values_per_example * 2))
    return max(1, min(block_examples, fits))


def plan_blocks(indices: np.ndarray, offsets: list[np.ndarray], block_examples: int) -> list[np.ndarray]:
    """Cut sorted example indices into runs whose rows are back to back in every one of ``offsets``
    (one ``[n_examples, 2]`` start/stop array per layer, of one cache or several), at most
    ``block_examples`` long.

    The seeded shuffles depend only on the block sizes, so anything that must see examples in the
    same order as a :class:`~unipt.train.loader.CacheBatches` (a paired cache, an online baseline) uses
    this plan.
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
    lengths: np.ndarray | None = None,
    carry: Callable[[T], T] | None = None,
) -> Iterator[list[tuple[int, T]]]:
    """One epoch's batches of ``(example index, item)``, ``read(block)`` giving one item per example.

    Shuffling permutes the block order, then examples within each window of ``shuffle_buffer_blocks``
    blocks, all from one generator seeded by ``(seed, epoch)``: the order depends on the block sizes
    (and ``lengths``) only, never on the items, so anything holding the same block plan (a cache, an
    online baseline) sees the same batches. ``read`` runs in a background thread, ``prefetch_blocks``
    blocks ahead (0: in the caller's thread, for reads too cheap to be worth one).

    ``lengths`` (token counts by example index) turns on length grouping: each window's examples, once
    shuffled, are sorted by length (stably, so equal lengths stay in shuffled order), cut into batches,
    and those batches leave in a seeded random order. The batch count is unchanged (full batches, then one
    partial batch at the end of the epoch). Without ``lengths`` the draws are exactly those made before
    grouping existed, so ``train.length_grouping: false`` reproduces earlier runs batch for batch.

    ``carry(item)``, if given, replaces each item that waits for the next window (the order is unchanged):
    with grouping the longest examples are the ones left over, window after window, so without it a few
    examples could keep every block they came from alive until the end of the epoch.
    """
    rng = np.random.default_rng([seed, epoch]) if shuffle else None
    order = rng.permutation(len(blocks)) if rng is not None else np.arange(len(blocks))
    items = ((blocks[i], read(blocks[i])) for i in order)
    if prefetch_blocks > 0:
        items = in_background(items, prefetch_blocks)
    window = shuffle_buffer_blocks if shuffle else 1
    pending: list[tuple[int, T]] = []
    buffered: list[tuple[np.ndarray, list[T]]] = []
    for block in items:
        buffered.append(block)
        if len(buffered) < window:
            continue
        pending += _examples_of(buffered, rng)
        buffered = []
        batches, pending = _full_batches(pending, lengths, batch_size, rng)
        yield from batches
        if carry is not None:
            pending = [(index, carry(item)) for index, item in pending]
    if buffered:
        pending += _examples_of(buffered, rng)
    if lengths is not None and rng is not None:
        batches, pending = _grouped(pending, lengths, batch_size, rng)
        yield from batches
    for start in range(0, len(pending), batch_size):
        yield pending[start : start + batch_size]


def _full_batches(
    pending: list[tuple[int, T]], lengths: np.ndarray | None, batch_size: int, rng: np.random.Generator | None
) -> tuple[list[list[tuple[int, T]]], list[tuple[int, T]]]:
    """(the full batches of a window's ``pending`` examples, the rest): grouped by length when shuffling
    with ``lengths``, else in their order."""
    if lengths is not None and rng is not None:
        return _grouped(pending, lengths, batch_size, rng)
    full = len(pending) // batch_size * batch_size
    return [pending[start : start + batch_size] for start in range(0, full, batch_size)], pending[full:]


def _grouped(
    examples: list[tuple[int, T]], lengths: np.ndarray, batch_size: int, rng: np.random.Generator
) -> tuple[list[list[tuple[int, T]]], list[tuple[int, T]]]:
    """(full batches of similar length in a random order, the rest): the rest, fewer than a batch of the
    longest examples, joins the next window (or ends the epoch as its one partial batch)."""
    keys = lengths[np.fromiter((index for index, _ in examples), dtype=np.int64, count=len(examples))]
    ranked = [examples[i] for i in np.argsort(keys, kind="stable")]
    full = len(ranked) // batch_size * batch_size
    batches = [ranked[start : start + batch_size] for start in range(0, full, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))], ranked[full:]


def _examples_of(
    blocks: list[tuple[np.ndarray, list[T]]], rng: np.random.Generator | None
) -> list[tuple[int, T]]:
    examples = [
        (int(index), item) for indices, items in blocks for index, item in zip(indices, items, strict=True)
    ]
    if rng is not None:
        examples = [examples[i] for i in rng.permutation(len(examples))]
    return examples
