"""Building a cache: create the store, write shards (from any number of workers), commit it.

Every shard write goes through :class:`~pipeline.checksums.ChecksumRecorder`, and the shard's
marker file (written last, in one piece) carries its token lengths and the checksums of the
files it wrote. A shard without a marker is simply redone on resume.
"""

from __future__ import annotations

import errno
import io
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from pipeline import FORMAT_VERSION
from pipeline.cache import CacheRoot, is_complete, read_attrs
from pipeline.cache_layout import (
    EXAMPLES_FILE,
    SHARD_MARKERS,
    LayerSpec,
    ShardSpec,
    StoreLayout,
    layer_array_name,
    scale_array_name,
)
from pipeline.checksums import ALGORITHM, CHECKSUMS_FILE, ChecksumRecorder, digest, merge
from pipeline.encoding import STORAGE_DTYPES, compressors, encode_rows, has_scale
from pipeline.errors import UniptError
from pipeline.storage import Location

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def clear_disk_full(location: Location, what: str) -> Iterator[None]:
    """Turn "no space left" during a write into one line that says where and what to do.

    The write it interrupts has no marker (a shard) or no ``complete`` flag (a commit), so nothing
    half-written is ever used, and rerunning after freeing space picks up the finished shards.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        raise UniptError(
            f"disk full while writing {what} to {location} ({os.strerror(exc.errno)}); the {what} is not "
            "committed: free space (or move storage.cache_root) and rerun, finished shards are kept"
        ) from exc


def _create_array(group: zarr.Group, name: str, shape: tuple, dtype: np.dtype, layout: StoreLayout) -> None:
    rows_per_chunk = (layout.chunk_rows, *shape[1:])
    group.create_array(
        name=name,
        shape=shape,
        chunks=rows_per_chunk,
        shards=(layout.rows_per_file, *shape[1:]) if layout.chunks_per_file > 1 else None,
        dtype=dtype,
        compressors=compressors(
            layout.codec, layout.shuffle, layout.compression_level, dtype.itemsize, layout.blosc_blocksize
        ),
        fill_value=0,
    )


class CacheBuilder:
    """Creates a partial store, collects finished shards, and commits the store atomically."""

    def __init__(self, cache_root: CacheRoot, key: str) -> None:
        self.cache_root = cache_root
        self.key = key
        self.location = cache_root.partial_location(key)

    def create(self, layout: StoreLayout, attrs: dict[str, Any]) -> None:
        """Create the arrays, or keep an existing partial store with the same key and layout (resume).

        The layout (shard plan, chunking, codec) is not part of the cache key, so a partial store
        laid out differently is discarded rather than mixed with new shards.
        """
        existing = read_attrs(self.location)
        if existing is not None:
            if existing.get("cache_key") == self.key and existing.get("layout") == layout.to_json():
                return
            self.location.remove()  # an unfinished store we cannot resume: start over
        group = zarr.open_group(store=self.location.zarr_store(), mode="w", zarr_format=3)
        dtype = STORAGE_DTYPES[layout.dtype]
        for spec in layout.layers:
            rows = layout.total_rows(spec)
            _create_array(group, layer_array_name(spec.index), (rows, spec.width), dtype, layout)
            if has_scale(layout.dtype):
                _create_array(group, scale_array_name(spec.index), (rows,), np.dtype(np.float32), layout)
        group.attrs.update(
            {
                **attrs,
                "layers": [spec.index for spec in layout.layers],
                "hidden_sizes": {str(spec.index): spec.width for spec in layout.layers},
                "grids": {str(s.index): list(s.grid) for s in layout.layers if s.grid},
                "dtype": layout.dtype,
                "max_length": layout.max_length,
                "layout": layout.to_json(),
                "cache_key": self.key,
                "format_version": FORMAT_VERSION,
                "complete": False,
            }
        )

    def publish_if_committed(self) -> Location | None:
        """Finish a commit that was interrupted between marking the store complete and publishing it."""
        if self.location != self.cache_root.location(self.key) and is_complete(self.location):
            return self._publish()
        return None

    def finished_shards(self) -> dict[int, dict[str, Any]]:
        """shard id -> its marker (token lengths, checksums) for every shard already written."""
        markers = self.location.child(SHARD_MARKERS)
        done = {}
        for name in markers.listdir():
            if name.endswith(".json") and name[:-5].isdigit():
                done[int(name[:-5])] = json.loads(markers.child(name).read_text())
        return done

    def commit(self, layout: StoreLayout, examples: pa.Table, attrs: dict[str, Any]) -> Location:
        """Write offsets, metadata and checksums, mark complete, and publish the store under its key."""
        shards = layout.shards()
        done = self.finished_shards()
        missing = [s.shard_id for s in shards if s.shard_id not in done]
        if missing:
            raise UniptError(f"cannot commit cache {self.key}: shards {missing[:5]} are not written yet")
        if examples.num_rows != layout.num_examples:
            raise UniptError(
                f"cannot commit cache {self.key}: {examples.num_rows} examples for a plan of "
                f"{layout.num_examples}"
            )
        lengths = np.zeros(layout.num_examples, dtype=np.int64)
        for shard in shards:
            lengths[shard.example_start : shard.example_stop] = done[shard.shard_id]["lengths"]
        with clear_disk_full(self.location, f"cache {self.key}"):
            self._write_commit(layout, examples, attrs, shards, done, lengths)
        self.location.child(SHARD_MARKERS).remove()
        return self._publish()

    def _write_commit(
        self,
        layout: StoreLayout,
        examples: pa.Table,
        attrs: dict[str, Any],
        shards: list[ShardSpec],
        done: dict[int, dict[str, Any]],
        lengths: np.ndarray,
    ) -> None:
        recorder = ChecksumRecorder(self.location.zarr_store())
        group = zarr.open_group(store=recorder, mode="r+")
        written = set()
        for spec in layout.layers:
            if spec.offsets_name in written:
                continue
            offsets = _offsets(layout, spec, lengths)
            group.create_array(name=spec.offsets_name, data=offsets, chunks=offsets.shape, overwrite=True)
            written.add(spec.offsets_name)

        table = examples.append_column("length", pa.array(lengths.astype(np.int32), pa.int32()))
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.location.child(EXAMPLES_FILE).write_bytes(buffer.getvalue())
        files = merge([done[s.shard_id].get("checksums", {}) for s in shards] + [recorder.digests])
        files[EXAMPLES_FILE] = digest(buffer.getvalue())
        self.location.child(CHECKSUMS_FILE).write_text(
            json.dumps({"algorithm": ALGORITHM, "files": files}, indent=0, sort_keys=True)
        )
        group.attrs.update(
            {
                **attrs,
                "num_examples": int(layout.num_examples),
                "total_tokens": int(lengths.sum()),
                "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "complete": True,  # written last: on object stores this is the commit
            }
        )

    def _publish(self) -> Location:
        final = self.cache_root.location(self.key)
        if final == self.location:
            return final
        try:
            os.replace(self.location.url, final.url)  # one rename: the store appears whole or not at all
        except OSError:
            if not is_complete(final):
                raise
            # Another run committed the same key first; its content is the same by construction.
            self.location.remove()
        return final


def _offsets(layout: StoreLayout, spec: LayerSpec, lengths: np.ndarray) -> np.ndarray:
    """[num_examples, 2] row ranges: tokens of one shard packed from the start of its span."""
    if spec.grid is not None:
        lengths = np.full(layout.num_examples, spec.grid[0] * spec.grid[1], dtype=np.int64)
    offsets = np.zeros((layout.num_examples, 2), dtype=np.int64)
    for shard in layout.shards():
        part = lengths[shard.example_start : shard.example_stop]
        base, _ = layout.row_span(shard, spec)
        starts = base + np.concatenate([[0], np.cumsum(part)[:-1]])
        offsets[shard.example_start : shard.example_stop, 0] = starts
        offsets[shard.example_start : shard.example_stop, 1] = starts + part
    return offsets


@dataclass(frozen=True)
class ShardWritten:
    raw_bytes: int  # activations handed in (decoded)
    stored_bytes: int  # what landed in the store after encoding and compression
    files: int


def write_shard(
    location: Location,
    layout: StoreLayout,
    shard: ShardSpec,
    layers: dict[int, np.ndarray],
    lengths: list[int] | None = None,
) -> ShardWritten:
    """Write one shard's token rows for every layer, then its marker.

    ``layers[l]`` holds the shard's rows back to back: ``[sum(lengths), width]`` for a token
    sequence layer, ``[num_examples * H * W, C]`` for a feature-map layer. ``lengths`` are the
    per-example token counts of the sequence layers (for a cache of feature maps only, leave it
    out: each example's length is then the first layer's H*W).
    Called by extraction workers; each shard owns its rows, so workers never share a file.
    """
    if lengths is None:
        first = layout.layers[0]
        if first.grid is None:
            raise UniptError(f"shard {shard.shard_id}: token lengths are required for token-sequence layers")
        lengths = [first.grid[0] * first.grid[1]] * shard.num_examples
    if len(lengths) != shard.num_examples:
        raise UniptError(f"shard {shard.shard_id}: {len(lengths)} lengths for {shard.num_examples} examples")
    with clear_disk_full(location, f"shard {shard.shard_id}"):
        return _write_shard(location, layout, shard, layers, lengths)


def _write_shard(
    location: Location,
    layout: StoreLayout,
    shard: ShardSpec,
    layers: dict[int, np.ndarray],
    lengths: list[int],
) -> ShardWritten:
    recorder = ChecksumRecorder(location.zarr_store())
    group = zarr.open_group(store=recorder, mode="r+")
    nbytes = 0
    for spec in layout.layers:
        if spec.index not in layers:
            raise UniptError(f"shard {shard.shard_id}: no rows for layer {spec.index}")
        rows = layers[spec.index]
        per_example = layout.rows_per_example(spec)
        expected = int(sum(lengths)) if spec.grid is None else shard.num_examples * per_example
        if rows.ndim != 2 or rows.shape != (expected, spec.width):
            raise UniptError(
                f"shard {shard.shard_id}, layer {spec.index}: rows of shape {rows.shape}, "
                f"expected ({expected}, {spec.width})"
            )
        if spec.grid is None and max(lengths, default=0) > layout.max_length:
            raise UniptError(
                f"shard {shard.shard_id} has an example of {max(lengths)} tokens, "
                f"more than max_length {layout.max_length}"
            )
        base, _ = layout.row_span(shard, spec)
        stored, scale = encode_rows(rows, layout.dtype)
        group[layer_array_name(spec.index)][base : base + expected] = stored
        if scale is not None:
            group[scale_array_name(spec.index)][base : base + expected] = scale
        nbytes += rows.nbytes
    marker = {"lengths": [int(n) for n in lengths], "checksums": dict(sorted(recorder.digests.items()))}
    # The marker appears, whole, only after every layer's rows are stored.
    location.child(SHARD_MARKERS, f"{shard.shard_id:06d}.json").write_text(json.dumps(marker))
    return ShardWritten(nbytes, sum(recorder.sizes.values()), len(recorder.sizes))
