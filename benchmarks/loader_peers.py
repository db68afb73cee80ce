"""What the loader benchmark compares the cache's reads against: a plain numpy copy of the same decoded bytes
(the ceiling), the same rows stored the way SAELens stores activations (a memory-mapped Arrow table, one
fixed-size row per example), and raw reads through the ``zarrs`` (Rust) codec pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import zarr

from unipt.pipeline.cache.layout import layer_array_name
from unipt.pipeline.cache.reader import CacheReader
from unipt.pipeline.cache.view import ViewReader
from unipt.train.block_plan import epoch_order
from unipt.train.loader import CacheBatches
from unipt.train.padding import as_float32, padding_mask

ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"


def decoded_blocks(reader: CacheReader, loader: CacheBatches) -> list[list[np.ndarray]]:
    """Every block's decoded rows, one array per layer: the bytes the copy ceiling copies."""
    blocks = []
    for block in loader.blocks:
        rows = []
        for layer in loader.layers:
            start, stop = loader.offsets[layer][block[0], 0], loader.offsets[layer][block[-1], 1]
            rows.append(reader.read_rows(layer, int(start), int(stop)))
        blocks.append(rows)
    return blocks


def copy_pass(blocks: list[list[np.ndarray]], seed: int) -> float:
    """Seconds to copy every block's decoded rows once with numpy, in a shuffled block order."""
    order = np.random.default_rng(seed).permutation(len(blocks))
    started = time.perf_counter()
    for i in order:
        for rows in blocks[i]:
            rows.copy()
    return time.perf_counter() - started


class ArrowPeer:
    """The loader's examples as SAELens (through Hugging Face ``datasets``) keeps cached activations: an
    uncompressed Arrow IPC file, one row per example, each layer a fixed-size ``[max_length, D]`` value
    padded to the longest example of the split, memory-mapped and read in the loader's own shuffled batches.

    Reads take the best path such a table allows (a numpy view of the mapped column, one gather per layer
    and batch) rather than ``datasets``' formatting, so the peer is measured at its fastest.
    """

    def __init__(self, reader: CacheReader, loader: CacheBatches, path: Path) -> None:
        self.loader = loader
        self.path = path
        self.lengths = loader.offsets[loader.layers[0]][:, 1] - loader.offsets[loader.layers[0]][:, 0]
        self.width = int(self.lengths[loader.indices].max())
        self._write(reader)
        self.source = pa.memory_map(str(path), "r")
        file = pa.ipc.open_file(self.source)
        # One record batch per block, as written: example index -> (record batch, row in it), and per layer a
        # zero-copy numpy view of each record batch's values in the mapped file.
        self.batch_of = np.full(len(self.lengths), -1, dtype=np.int64)
        self.row_of = np.full(len(self.lengths), -1, dtype=np.int64)
        self.columns: list[list[np.ndarray]] = [[] for _ in loader.layers]
        for b in range(file.num_record_batches):
            record = file.get_batch(b)
            index = record.column(0).to_numpy()
            self.batch_of[index], self.row_of[index] = b, np.arange(len(index))
            for column, layer in zip(self.columns, loader.layers, strict=True):
                values = record.column(f"layer_{layer}").flatten().flatten()
                shape = (len(index), self.width, reader.hidden_sizes[layer])
                column.append(values.to_numpy(zero_copy_only=True).reshape(shape))

    def _write(self, reader: CacheReader) -> None:
        loader = self.loader
        fields = [pa.field(f"layer_{layer}", self._type(reader, layer)) for layer in loader.layers]
        schema = pa.schema([pa.field("index", pa.int64()), *fields])
        with pa.OSFile(str(self.path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for block in loader.blocks:
                columns = [pa.array(block, pa.int64())]
                for layer in loader.layers:
                    dim = reader.hidden_sizes[layer]
                    offsets = loader.offsets[layer]
                    base = int(offsets[block[0], 0])
                    rows = reader.read_rows(layer, base, int(offsets[block[-1], 1]))
                    padded = np.zeros((len(block), self.width, dim), dtype=rows.dtype)
                    for row, index in enumerate(block):
                        start, stop = int(offsets[index, 0]) - base, int(offsets[index, 1]) - base
                        padded[row, : stop - start] = rows[start:stop]
                    flat = pa.array(padded.reshape(-1))
                    tokens = pa.FixedSizeListArray.from_arrays(flat, dim)
                    columns.append(pa.FixedSizeListArray.from_arrays(tokens, self.width))
                writer.write_batch(pa.record_batch(columns, schema=schema))

    def _type(self, reader: CacheReader, layer: int) -> pa.DataType:
        dtype = np.float16 if reader.dtype == "float16" else np.float32
        return pa.list_(pa.list_(pa.from_numpy_dtype(dtype), reader.hidden_sizes[layer]), self.width)

    def batches(self, epoch: int) -> Iterator[tuple[np.ndarray, list[torch.Tensor], torch.Tensor]]:
        """One epoch's (example indices, padded layers in the loader's dtype, mask): the loader's examples
        and order."""
        loader = self.loader
        order = epoch_order(
            loader.blocks,
            lambda block: [None] * len(block),
            loader.batch_size,
            loader.shuffle,
            seed=loader.seed,
            epoch=epoch,
            shuffle_buffer_blocks=loader.shuffle_buffer_blocks,
            prefetch_blocks=0,
            lengths=loader.lengths if loader.length_grouping else None,
        )
        for examples in order:
            indices = np.array([index for index, _ in examples], dtype=np.int64)
            lengths = self.lengths[indices]
            longest = int(lengths.max())
            parts = self.batch_of[indices]
            hidden = []
            for column in self.columns:
                out = np.empty((len(indices), longest, column[0].shape[2]), dtype=column[0].dtype)
                for part in np.unique(parts):  # a batch draws from the few blocks of one shuffle window
                    where = np.flatnonzero(parts == part)
                    out[where] = column[part][self.row_of[indices[where]], :longest]
                # The loader's own rule: 16-bit rows stay 16-bit for to_device (training keeps them).
                hidden.append(torch.from_numpy(out) if loader.keep_dtype else as_float32(out))
            yield indices, hidden, padding_mask(lengths)

    def epoch(self, epoch: int) -> int:
        """One epoch of batches; the examples delivered."""
        return sum(len(indices) for indices, _, _ in self.batches(epoch))

    def nbytes_on_disk(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        self.columns = []
        self.source.close()


def zarrs_reads(reader: CacheReader) -> Callable[[int, int, int], np.ndarray] | None:
    """``read(layer, start, stop)``: the reader's rows read through the zarrs codec pipeline, or None where
    that cannot be done: zarrs not installed, a remote store, or a dtype decoded after the read (bfloat16,
    int8, float8). A view's rows are gathered from its segments exactly as its own ``read_rows`` does.

    zarrs refuses wrapped stores ("zarrs-python does not support CheckedStore stores") and zarr then falls
    back to its own pipeline, so these arrays sit on a plain LocalStore: zarrs checks every chunk's crc32c,
    but not the manifest's position/missing-chunk checks that
    :class:`~unipt.pipeline.cache.checksums.CheckedStore` adds.
    """
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return None
    sources = reader.segments if isinstance(reader, ViewReader) else [reader]
    if reader.dtype not in ("float16", "float32") or not all(s.location.is_local for s in sources):
        return None
    arrays = []
    with zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE}):
        for source in sources:
            group = zarr.open_group(zarr.storage.LocalStore(source.location.url, read_only=True), mode="r")
            arrays.append({layer: group[layer_array_name(layer)] for layer in reader.layers})
    pipelines = {type(a._async_array.codec_pipeline).__name__ for a in arrays[0].values()}
    if pipelines != {"ZarrsCodecPipeline"}:  # zarr fell back to its own pipeline: nothing to compare
        return None

    def read(layer: int, start: int, stop: int) -> np.ndarray:
        if not isinstance(reader, ViewReader):
            return arrays[0][layer][start:stop]
        name = reader.layer_spec(layer).offsets_name
        return reader._gather(name, start, stop, lambda seg, lo, hi: arrays[seg][layer][lo:hi])

    return read


def zarrs_pass(read: Callable[[int, int, int], np.ndarray], loader: CacheBatches, seed: int) -> float:
    """Seconds for :func:`benchmarks.loader_throughput.raw_pass`'s reads through the zarrs pipeline."""
    order = np.random.default_rng(seed).permutation(len(loader.blocks))
    started = time.perf_counter()
    for i in order:
        block = loader.blocks[i]
        for layer in loader.layers:
            offsets = loader.offsets[layer]
            read(layer, int(offsets[block[0], 0]), int(offsets[block[-1], 1]))
    return time.perf_counter() - started
