"""Stream padded batches out of a ragged activation cache.

Examples are read in *blocks*: runs of consecutive examples whose tokens sit in one
contiguous row range, so a block costs one sequential read per layer. Training shuffles the
block order and then examples within a window of blocks (a shuffle buffer); a background
thread reads the next blocks (each block's layers concurrently, ``reader_threads`` at a time) and a
second one pads them into batches while the model computes. Training on the CPU reads and pads between
steps instead (``train.loader_background``: the step's threads already use every core). Only the
requested layers are read.

Rows that need no decoding (float16, float32, and bfloat16 kept as its bits) from an uncompressed local
store are never copied into a block: a block holds read-only views into the chunk files' memory maps
(:meth:`~unipt.pipeline.cache.activation_cache.ActivationCache.stored_pieces`), so each row is copied once,
from the page cache
straight into its batch. Padding is one slice copy (a memcpy) per example and layer, in the decoded dtype
(a vectorised gather + scatter per source block measured no faster on this 2-core machine). With
``length_grouping`` the examples of each shuffle window are sorted by length before they are cut into
batches (the batches then go out in a seeded random order), so a batch pads to about its own length
rather than to the window's longest example.
Training batches (:meth:`CacheBatches.for_split`) keep the cache's 16-bit rows as they are stored (fp16
stays fp16, bf16 stays bf16) and the training thread upcasts them where it computes (:func:`to_device`):
on CUDA after a ``non_blocking`` copy out of pinned host memory, on the CPU with torch's vectorised cast
inside the step. Half the bytes are padded, queued and copied, and the loader threads do no casting. Other
readers (probe, prediction) get float32 batches, upcast in the collate thread
(:func:`~unipt.train.padding.as_float32`).

The loader holds a few blocks at once (the shuffle window and, when it works ahead, one block read ahead)
and, working ahead, one padded batch ahead of the one training computes on; ``memory_mb`` caps the blocks'
float16 bytes by reading fewer examples per block where examples are wide
(:func:`~unipt.train.block_plan.budgeted_block_examples`), so a BERT-large cache does not hold gigabytes in
flight. With ``train.keep_decoded_mb`` the training split's
blocks stay decoded for later epochs, within their own budget. With ``return_freed_memory`` the pages
those blocks and batches leave behind go back to the system after each large batch
(:mod:`unipt.train.allocator`).

A feature-map cache (CNN stages) comes out as maps: each stage is ``[B, C, H, W]``, read through
that stage's own offsets, since its H*W rows per image differ from every other stage's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import numpy as np
import torch

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.cache.layout import layer_array_name
from unipt.pipeline.config import TrainConfig
from unipt.pipeline.data.augment import TRAIN_SPLIT, view_for_epoch
from unipt.pipeline.errors import UniptError
from unipt.train.allocator import return_freed_memory
from unipt.train.background import in_background
from unipt.train.block_plan import blocks_held, budgeted_block_examples, epoch_order, plan_blocks
from unipt.train.blocks import Block, blocks_over, own_rows
from unipt.train.padding import as_float32, padding_mask

T = TypeVar("T")  # what a layer read gives
PREFETCH_BLOCKS = 1  # blocks read ahead of training: a deeper queue bought no speed, only memory
# ``memory_mb`` is shared out over the blocks a loader held when the budget was introduced (this many queued):
# kept fixed so block plans, and so the batches of earlier runs, do not move; the loader now holds fewer.
BUDGETED_PREFETCH_BLOCKS = 4
# With return_freed_memory, freed pages go back to the system after a batch of at least this many activation
# values (32 MiB in float16). Smaller batches leave holes too small to matter, while the pages a trim returns
# are zeroed again when the next step uses them: on MiniLM-sized batches (~10 MiB of float16) trimming after
# each made the epoch 1.6x longer.
TRIM_AFTER_BATCH_VALUES = 16 * 2**20
COLLATED_AHEAD = 1  # padded batches made ahead of training: each is as large as a training step's input


@dataclass
class Batch:
    # One tensor per requested layer: [B, N, D_l] zero-padded tokens, or [B, C_l, H_l, W_l] maps. float32,
    # or the cache's 16-bit dtype (float16, bfloat16) when the loader keeps it for the device (to_device).
    hidden: list[torch.Tensor]
    mask: torch.Tensor  # [B, N] bool, True on real tokens; for maps all True over the last layer's H*W
    labels: torch.Tensor  # [B]: int64 class ids, or the float targets of a regression cache
    indices: np.ndarray  # example indices in the cache


def to_device(
    batch: Batch,
    device: torch.device,
    model: torch.nn.Module | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A batch's hidden states and mask on ``device``, the hidden states in ``dtype`` (float32, or the
    autocast dtype training runs in) unless ``model`` takes them in the cache's 16-bit dtype
    (``takes_stored_dtype``, see :mod:`unipt.train.stored_inputs`).

    Copies are ``non_blocking`` (they overlap compute when the batch sits in pinned memory), and a
    16-bit batch is upcast after the copy, on the device: half the bytes cross the bus. On the CPU the
    upcast is one vectorised torch cast per layer in the training thread.
    """
    hidden = [h.to(device, non_blocking=True) for h in batch.hidden]
    if not getattr(model, "takes_stored_dtype", False):
        # Only activations are upcast: the online baselines' batches carry token ids, which stay integers.
        hidden = [h.to(dtype) if h.is_floating_point() else h for h in hidden]
    return hidden, batch.mask.to(device, non_blocking=True)


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
        prefetch_blocks: int = PREFETCH_BLOCKS,
        length_grouping: bool = False,
        reader_threads: int = 4,
        pin_memory: bool = False,
        views: bool = False,
        keep_dtype: bool = False,
        memory_mb: int | None = None,
        return_freed_memory: bool = False,
    ) -> None:
        self.reader = reader
        self.layers = list(layers)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer_blocks = shuffle_buffer_blocks
        self.prefetch_blocks = prefetch_blocks
        self.length_grouping = length_grouping
        self.reader_threads = max(1, reader_threads)
        self.return_freed_memory = return_freed_memory
        # Decoded blocks kept across epochs, by (view, first example, examples), while they fit this budget:
        # none unless for_split sets it (train.keep_decoded_mb), since only it knows the training config.
        self.keep_decoded_bytes = 0
        self._kept: dict[tuple[int, int, int], list[tuple[Block, int]]] = {}
        self._kept_bytes = 0
        # Pinned batches are for a CUDA copy; they keep the cache's dtype so the device does the upcast.
        self.pin_memory = pin_memory and torch.cuda.is_available()
        # 16-bit rows stay 16-bit until to_device when asked (training), or when they go to CUDA.
        self.keep_dtype = keep_dtype or self.pin_memory
        # bfloat16 rows are kept as their stored bits (numpy has no bfloat16) and viewed as torch.bfloat16.
        self.raw_bfloat16 = self.keep_dtype and reader.dtype == "bfloat16"
        self._pool: ThreadPoolExecutor | None = None
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
        self._plan_blocks(block_examples, memory_mb, shuffle_buffer_blocks)
        # Augmented views (training only): epoch e reads view (e + seed) mod K of every example, each
        # view through its own reader and offsets, made when the epoch starts.
        self.num_views = reader.num_views if views else 1
        self._views: dict[int, tuple[ActivationCache, dict[int, np.ndarray]]] = {0: (reader, self.offsets)}
        first = self.offsets[self.layers[0]]
        # Token counts decide the grouping; feature maps all have one size, so there is nothing to group.
        self.lengths = None if self.maps else first[:, 1] - first[:, 0]

    def _plan_blocks(self, block_examples: int, memory_mb: int | None, shuffle_buffer_blocks: int) -> None:
        """The block plan over the requested layers' rows, blocks cut to fewer examples where ``memory_mb``
        asks it."""
        distinct = list({id(o): o for o in self.offsets.values()}.values())  # token layers share one
        block_examples = budgeted_block_examples(
            block_examples,
            self._values_per_example(),
            memory_mb,
            blocks_held=blocks_held(BUDGETED_PREFETCH_BLOCKS, shuffle_buffer_blocks),
        )
        self.blocks = plan_blocks(self.indices, distinct, block_examples)
        self.block_examples = block_examples
        self._plan = list(self.blocks)  # this cache's own plan (a paired cache may replace self.blocks)

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
        """One split's batches as training reads them: batch size, block plan, shuffle, length grouping
        (training only) and reader threads from ``config``; pinned float16 batches when it trains on CUDA.

        ``layers`` defaults to every layer of the cache.
        """
        from unipt.train.fit import pick_device  # unipt.train.fit does not import the loader: no cycle

        device = pick_device(config.device)
        data = cls(
            reader,
            split,
            reader.layers if layers is None else layers,
            config.batch_size,
            shuffle=shuffle,
            seed=seed,
            block_examples=config.block_examples,
            shuffle_buffer_blocks=config.shuffle_buffer_blocks,
            prefetch_blocks=PREFETCH_BLOCKS if works_in_background(config.loader_background, device) else 0,
            length_grouping=config.length_grouping and shuffle,
            reader_threads=config.reader_threads,
            pin_memory=device.type == "cuda",
            views=shuffle and split == TRAIN_SPLIT,
            keep_dtype=True,  # every training consumer goes through to_device, which upcasts
            memory_mb=config.loader_memory_mb,
            return_freed_memory=config.return_freed_memory,
        )
        if split == TRAIN_SPLIT:  # one budget, for the split read every epoch
            data.keep_decoded_bytes = data.kept_bytes_for(config)
        return data

    def kept_bytes_for(self, config: TrainConfig) -> int:
        """The bytes of decoded blocks to keep across epochs for ``config.keep_decoded_mb``: ``auto`` keeps
        the whole split when there is a later epoch to use it and the split's decoded rows fit in
        ``train.loader_memory_mb`` (holding them then costs no more than the loader may hold). A cache with
        augmented views reads another view each epoch, so ``auto`` keeps nothing there."""
        if config.keep_decoded_mb != "auto":
            return int(config.keep_decoded_mb) * 2**20
        if config.epochs < 2 or config.loader_memory_mb is None or self.num_views > 1:
            return 0
        budget = config.loader_memory_mb * 2**20
        return budget if self.decoded_bytes() <= budget else 0

    def decoded_bytes(self) -> int:
        """This split's rows of the requested layers as the loader holds them decoded."""
        # float16 decodes to itself; bfloat16 stays its stored bits for training; the rest become float32.
        itemsize = 2 if self.reader.dtype == "float16" or self.raw_bfloat16 else 4
        return int(self._values_per_example() * len(self.indices) * itemsize)

    def _values_per_example(self) -> float:
        """Mean values (over this split's examples and the requested layers) one example's rows hold."""
        if len(self.indices) == 0:
            return 0.0
        total = 0.0
        for layer in self.layers:
            spans = self.offsets[layer][self.indices]
            total += float(np.mean(spans[:, 1] - spans[:, 0])) * self.reader.hidden_sizes[layer]
        return total

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def view_of_epoch(self, epoch: int) -> int:
        """The augmented view this split reads in ``epoch``: 0 unless it trains on a cache with views."""
        return view_for_epoch(epoch, self.seed, self.num_views) if self.num_views > 1 else 0

    def _view(self, view: int) -> tuple[ActivationCache, dict[int, np.ndarray]]:
        if view not in self._views:
            reader = self.reader.view(view)
            offsets = {layer: reader.offsets_for(layer) for layer in self.layers}
            distinct = list({id(o): o for o in offsets.values()}.values())
            # Every view's virtual rows are gap-free, so its blocks are view 0's; the shuffles (which
            # depend on block sizes only) and a paired cache's plan stay valid whichever view is read.
            own = plan_blocks(self.indices, distinct, self.block_examples)
            if len(own) != len(self._plan) or not all(map(np.array_equal, own, self._plan)):
                raise UniptError(
                    f"cache {self.reader.source}: augmented view {view} cuts into other blocks than view 0; "
                    f"run `unipt cache verify {self.reader.source}`"
                )
            # Only view 0 and the latest view stay: memory stays at two views' offsets however large K.
            for old in [k for k in self._views if k not in (0, view)]:
                del self._views[old]
            self._views[view] = (reader, offsets)
        return self._views[view]

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        view = self.view_of_epoch(epoch)
        self._view(view)  # opened here, so a bad view fails before any batch
        order = epoch_order(
            self.blocks,
            partial(self._kept_or_read, view=view),
            self.batch_size,
            self.shuffle,
            seed=self.seed,
            epoch=epoch,
            shuffle_buffer_blocks=self.shuffle_buffer_blocks,
            prefetch_blocks=self.prefetch_blocks,
            lengths=self.lengths if self.length_grouping else None,
            carry=own_rows,
        )
        batches = (self._collate_and_trim(examples) for examples in order)
        if self.prefetch_blocks > 0:
            # Padding runs in its own thread too: the training thread only takes finished batches.
            batches = in_background(batches, COLLATED_AHEAD, name="cache-collate")
        yield from batches

    def _kept_or_read(self, indices: np.ndarray, view: int = 0) -> list[tuple[Block, int]]:
        """A block's decoded rows: kept from an earlier epoch, or read now (and kept while they fit)."""
        if not self.keep_decoded_bytes:
            return self._read_block(indices, view)
        key = (view, int(indices[0]), len(indices))
        if key in self._kept:
            return self._kept[key]
        items = self._read_block(indices, view)
        blocks = {id(block): block for block, _ in items}.values()  # a block read as views: one per piece
        size = sum(rows.nbytes for block in blocks for rows in block.rows.values())
        if self._kept_bytes + size <= self.keep_decoded_bytes:
            self._kept[key] = items  # padding only copies out of a block's rows, so they can be shared
            self._kept_bytes += size
        return items

    def _read_block(self, indices: np.ndarray, view: int = 0) -> list[tuple[Block, int]]:
        """Every layer's rows of one block (of augmented view ``view``), the layers read concurrently
        (Zarr decodes off the GIL)."""
        reader, offsets = self._view(view)
        spans = {}
        for layer in self.layers:
            starts, stops = offsets[layer][indices, 0], offsets[layer][indices, 1]
            spans[layer] = (starts, stops, int(starts[0]), int(stops[-1]))

        if self._reads_as_stored() and all(
            np.array_equal(spans[layer][0], spans[self.layers[0]][0]) for layer in self.layers
        ):
            # Rows that need no decoding stay where they are: views into the store's memory maps, which
            # padding then copies once, straight into the batch.
            def pieces(layer: int) -> list[tuple[int, np.ndarray]]:
                _, _, base, end = spans[layer]
                return reader.stored_pieces(layer_array_name(layer), base, end)

            starts, stops, _, _ = spans[self.layers[0]]
            return blocks_over(dict(zip(self.layers, self._per_layer(pieces), strict=True)), starts, stops)

        def read(layer: int) -> np.ndarray:
            _, _, base, end = spans[layer]
            if self.raw_bfloat16:  # the stored bits, viewed as torch.bfloat16 once padded (no decoding)
                return reader.read_stored(layer_array_name(layer), base, end)
            return reader.read_rows(layer, base, end)

        rows = dict(zip(self.layers, self._per_layer(read), strict=True))
        block = Block(
            rows,
            {layer: spans[layer][0] - spans[layer][2] for layer in self.layers},
            {layer: spans[layer][1] - spans[layer][2] for layer in self.layers},
        )
        return [(block, i) for i in range(len(indices))]

    def _reads_as_stored(self) -> bool:
        """Whether the batches take the rows as stored: 16- and 32-bit floats (which decode to themselves) and
        bfloat16 kept as its bits; token layers only (a feature map stage has offsets of its own)."""
        return not self.maps and (self.reader.dtype in ("float16", "float32") or self.raw_bfloat16)

    def _per_layer(self, read: Callable[[int], T]) -> list[T]:
        """``read(layer)`` for every requested layer, ``reader_threads`` at a time (Zarr decodes and crc32c
        checks run off the GIL)."""
        if self.reader_threads > 1 and len(self.layers) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.reader_threads, thread_name_prefix="cache-read")
            return list(self._pool.map(read, self.layers))
        return [read(layer) for layer in self.layers]

    def _collate_and_trim(self, examples: list[tuple[int, tuple[Block, int]]]) -> Batch:
        batch = self._collate(examples)
        if self.return_freed_memory:
            return_memory_after(batch)  # what the blocks and batches before this one left
        return batch

    def _collate(self, examples: list[tuple[int, tuple[Block, int]]]) -> Batch:
        if self.maps:
            return self._collate_maps(examples)
        first = self.layers[0]
        spans = [(blk, int(blk.starts[first][i]), int(blk.stops[first][i])) for _, (blk, i) in examples]
        lengths = np.array([stop - start for _, start, stop in spans], dtype=np.int64)
        longest = int(lengths.max())
        hidden = []
        for layer in self.layers:
            # Token layers share one offsets array, so the first layer's spans hold for every layer. One
            # slice copy (a memcpy) per example, in the decoded dtype: on this 2-core machine that costs a
            # quarter of the CPU of a fancy-index gather + scatter with the float16 -> float32 cast folded
            # in (numpy's cast is scalar code, ~1 GB/s; torch's, below, is vectorised).
            sample = spans[0][0].rows[layer]
            out = self._empty((len(examples), longest, sample.shape[1]), sample.dtype)
            for row, (blk, start, stop) in enumerate(spans):
                out[row, : stop - start] = blk.rows[layer][start:stop]
            hidden.append(self._as_tensor(out))
        mask = padding_mask(lengths)
        indices = np.array([ex[0] for ex in examples], dtype=np.int64)
        return Batch(hidden=hidden, mask=mask, labels=torch.from_numpy(self.labels[indices]), indices=indices)

    def _as_tensor(self, padded: np.ndarray) -> torch.Tensor:
        """A padded batch array as the tensor a Batch carries: its 16-bit dtype kept for to_device's upcast,
        or float32 (upcast here) for readers that take the batch as it is."""
        if not self.keep_dtype:
            return as_float32(padded)
        tensor = torch.from_numpy(padded)
        return tensor.view(torch.bfloat16) if self.raw_bfloat16 else tensor

    def _empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A zeroed batch array; in pinned (page-locked) memory when the batch goes to CUDA."""
        if not self.pin_memory:
            return np.zeros(shape, dtype=dtype)
        tensor = torch.zeros(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True)
        return tensor.numpy()

    def _collate_maps(self, examples: list[tuple[int, tuple[Block, int]]]) -> Batch:
        hidden = []
        for layer in self.layers:
            h, w = self.grids[layer]
            maps = [
                blk.rows[layer][blk.starts[layer][i] : blk.stops[layer][i]].reshape(h, w, -1)
                for _, (blk, i) in examples
            ]
            hidden.append(self._as_tensor(np.stack(maps)).permute(0, 3, 1, 2).contiguous())  # [B, C, H, W]
        h, w = self.grids[self.layers[-1]]
        mask = torch.ones(len(examples), h * w, dtype=torch.bool)
        indices = np.array([ex[0] for ex in examples], dtype=np.int64)
        return Batch(hidden=hidden, mask=mask, labels=torch.from_numpy(self.labels[indices]), indices=indices)

    def close(self) -> None:
        """Stop the reader threads (they also end with the process)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def works_in_background(setting: str | bool, device: torch.device) -> bool:
    """Whether the loader reads and pads ahead in its own threads (``train.loader_background``).

    ``auto``: on a GPU, yes: the step runs on the device and the CPU is free to prepare the next batch. On
    the CPU, no: torch's intra-op threads already occupy every core during a step, so a background reader
    can only take its time from the step (measured on 2 cores: no faster than reading between steps), while
    the batch and block it holds ahead raise the peak memory.
    """
    return device.type != "cpu" if setting == "auto" else bool(setting)


def return_memory_after(batch: Batch) -> None:
    """Hand freed memory back to the system (:mod:`unipt.train.allocator`) after a large batch: at least
    :data:`TRIM_AFTER_BATCH_VALUES` activation values, whatever their dtype. The online baseline calls it on
    the hidden states its backbone computed, so a cache-vs-online comparison treats both alike."""
    values = sum(h.numel() for h in batch.hidden if h.is_floating_point())
    if values >= TRIM_AFTER_BATCH_VALUES:
        return_freed_memory()
