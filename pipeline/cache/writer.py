"""Building a cache: create the store, write shards (from any number of workers), commit it.

Every shard write goes through :class:`~unipt.pipeline.cache.checksums.ChecksumRecorder`, and the shard's
marker file (written last, in one piece) carries its token lengths and the checksums (sha256 and
crc32c trailers) of the files it wrote. A shard without a marker is simply redone on resume. The
commit writes the offsets, ``examples.parquet``, the sealed manifest ``checksums.json`` (covering
every chunk and every metadata file) and, last, the root ``zarr.json`` with ``complete: true``.
"""

from __future__ import annotations

import errno
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from unipt.pipeline import FORMAT_VERSION
from unipt.pipeline.cache.checksums import CHECKSUMS_FILE, ChecksumRecorder, digest, merge, seal
from unipt.pipeline.cache.encoding import compressors, encode_rows, offsets_compressors
from unipt.pipeline.cache.layout import (
    EXAMPLES_FILE,
    METADATA_FILE,
    SHARD_MARKERS,
    ArraySpec,
    LayerSpec,
    ShardSpec,
    StoreLayout,
    layer_array_name,
    scale_array_name,
)
from unipt.pipeline.cache.publish import publish
from unipt.pipeline.cache.root import CacheRoot, is_complete, read_attrs
from unipt.pipeline.errors import UniptError
from unipt.pipeline.log import utc_timestamp
from unipt.pipeline.storage import Location

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


def _create_array(group: zarr.Group, spec: ArraySpec, layout: StoreLayout) -> None:
    group.create_array(
        name=spec.name,
        shape=spec.shape,
        chunks=spec.chunks,
        shards=spec.shards,
        dtype=spec.dtype,
        compressors=compressors(
            layout.codec,
            layout.shuffle,
            layout.compression_level,
            spec.dtype.itemsize,
            layout.blosc_blocksize,
        ),
        fill_value=0,
    )


def _sharded(layout: StoreLayout) -> dict[str, int]:
    """Arrays written with Zarr sharding -> chunks per file (what the checksum recorder must parse)."""
    if layout.chunks_per_file <= 1:
        return {}
    return {name: layout.chunks_per_file for name, spec in layout.arrays().items() if spec.layer is not None}


class CacheBuilder:
    """Creates a partial store, collects finished shards, and commits the store atomically."""

    def __init__(self, cache_root: CacheRoot, key: str, final: Location | None = None) -> None:
        """``final``: where the committed store goes (a segment of an activation space); by default
        ``<cache_root>/<key>``, a self-contained cache. Locally it is built in ``.partial/<key>``."""
        self.cache_root = cache_root
        self.key = key
        self.final = final if final is not None else cache_root.location(key)
        self.location = cache_root.partial_location(key) if cache_root.root.is_local else self.final

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
        for spec in layout.arrays().values():
            if spec.layer is not None:  # offsets are written at commit, once every length is known
                _create_array(group, spec, layout)
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
        if self.location != self.final and is_complete(self.location):
            return publish(self.location, self.final)
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
        return publish(self.location, self.final)

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
        arrays = layout.arrays()
        for spec in arrays.values():
            if spec.layer is None:
                group.create_array(
                    name=spec.name,
                    data=layout.offsets(_spec_using(layout, spec.name), lengths),
                    chunks=spec.chunks,
                    compressors=offsets_compressors(),
                    overwrite=True,
                )

        table = examples.append_column("length", pa.array(lengths.astype(np.int32), pa.int32()))
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.location.child(EXAMPLES_FILE).write_bytes(buffer.getvalue())
        files = merge([done[s.shard_id].get("checksums", {}) for s in shards] + [recorder.digests])
        trailers = merge([done[s.shard_id].get("trailers", {}) for s in shards] + [recorder.trailers])
        files[EXAMPLES_FILE] = digest(buffer.getvalue())
        # Metadata is covered too: each array's zarr.json (written once, at create or just above; a few
        # small reads) and the root's final bytes, which this commit writes itself so the manifest can
        # hold their digest before they exist.
        for name in arrays:
            files[f"{name}/{METADATA_FILE}"] = digest(self.location.child(name, METADATA_FILE).read_bytes())
        root = json.loads(self.location.child(METADATA_FILE).read_text())
        root["attributes"] = {
            **root.get("attributes", {}),
            **attrs,
            "num_examples": int(layout.num_examples),
            "total_tokens": int(lengths.sum()),
            "committed_at": utc_timestamp(),
            "complete": True,
        }
        root_bytes = json.dumps(root, indent=2, sort_keys=True).encode()
        files[METADATA_FILE] = digest(root_bytes)
        self.location.child(CHECKSUMS_FILE).write_text(
            json.dumps(seal(files, trailers), indent=0, sort_keys=True)
        )
        # Written last, in one piece: on object stores `complete: true` appearing is the commit.
        self.location.child(METADATA_FILE).write_bytes(root_bytes)


def _spec_using(layout: StoreLayout, offsets_name: str) -> LayerSpec:
    """The first layer whose rows an offsets array describes (all token layers share ``offsets``)."""
    return next(spec for spec in layout.layers if spec.offsets_name == offsets_name)


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
    scales: dict[int, np.ndarray] | None = None,
) -> ShardWritten:
    """Write one shard's token rows for every layer, then its marker.

    ``layers[l]`` holds the shard's rows back to back: ``[sum(lengths), width]`` for a token
    sequence layer, ``[num_examples * H * W, C]`` for a feature-map layer. ``lengths`` are the
    per-example token counts of the sequence layers (for a cache of feature maps only, leave it
    out: each example's length is then the first layer's H*W).
    ``scales``: the rows are already encoded (as stored, with these int8 scales when the dtype has
    them), copied from another store without a decode/encode round trip (``unipt cache compact``).
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
        return _write_shard(location, layout, shard, layers, lengths, scales)


def _write_shard(
    location: Location,
    layout: StoreLayout,
    shard: ShardSpec,
    layers: dict[int, np.ndarray],
    lengths: list[int],
    scales: dict[int, np.ndarray] | None = None,
) -> ShardWritten:
    recorder = ChecksumRecorder(location.zarr_store(), chunks_per_file=_sharded(layout))
    group = zarr.open_group(store=recorder, mode="r+")
    # Every chunk with rows is written, even one that is all zeros (Zarr skips those by default): the
    # reader treats a missing chunk the layout says holds rows as damage, never as zeros.
    write_config = {"write_empty_chunks": True}
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
        if scales is None:
            stored, scale = encode_rows(rows, layout.dtype)
        else:
            stored, scale = rows, scales.get(spec.index)
        group[layer_array_name(spec.index)].with_config(write_config)[base : base + expected] = stored
        if scale is not None:
            group[scale_array_name(spec.index)].with_config(write_config)[base : base + expected] = scale
        nbytes += rows.nbytes
    marker = {
        "lengths": [int(n) for n in lengths],
        "checksums": dict(sorted(recorder.digests.items())),
        "trailers": dict(sorted(recorder.trailers.items())),
    }
    # The marker appears, whole, only after every layer's rows are stored.
    location.child(SHARD_MARKERS, f"{shard.shard_id:06d}.json").write_text(json.dumps(marker))
    return ShardWritten(nbytes, sum(recorder.sizes.values()), len(recorder.sizes))
