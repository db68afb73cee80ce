"""The activation cache: one Zarr v3 store per (dataset, backbone, settings) cache key.

Layout of ``<cache_root>/<key>/``::

    zarr.json            group attributes: format version, cache key and the fields hashed into it
                         (dataset fingerprint, backbone weights/config/tokenizer hashes, layers,
                         max length, dtype), hidden sizes, label names, counts, ``complete: true``
    layer_00/ ...        one array per stored hidden state, shape [rows, hidden], dtype fp16 by
                         default, chunked along rows (tokens) and Blosc/zstd-compressed
    offsets/             int64 [num_examples, 2]: example i's tokens are rows offsets[i,0]:offsets[i,1]
    examples.parquet     per-example metadata: example_id, label, length, split

Tokens are stored ragged: no padding is written. Extraction is split into shards and each
shard owns a chunk-aligned range of rows sized for its worst case (examples x max_length),
so parallel writers never touch the same chunk. Rows a shard does not fill are never written
and take no disk (Zarr does not store chunks that were never written); readers only ever
ask for the rows in ``offsets``.

A cache is built under ``<cache_root>/.partial/<key>/`` with a marker file per finished shard
(so an interrupted build resumes), and becomes visible only when it is complete: the
finished directory is renamed to ``<cache_root>/<key>`` in one step. Readers refuse a store
that is incomplete, from another format version, or built for another dataset or backbone.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec

from pipeline import FORMAT_VERSION
from pipeline.errors import UniptError
from pipeline.hashing import sha256_json

OFFSETS = "offsets"
EXAMPLES_FILE = "examples.parquet"
SHARD_MARKERS = "_shards"
PARTIAL_DIR = ".partial"
_DTYPES = {"float16": np.float16, "float32": np.float32}


def layer_array_name(layer: int) -> str:
    return f"layer_{layer:02d}"


@dataclass(frozen=True)
class ShardSpec:
    """A contiguous run of examples and the chunk-aligned rows reserved for their tokens."""

    shard_id: int
    example_start: int
    example_stop: int
    row_base: int
    row_capacity: int

    @property
    def num_examples(self) -> int:
        return self.example_stop - self.example_start


def plan_shards(num_examples: int, shard_size: int, max_tokens: int, chunk_rows: int) -> list[ShardSpec]:
    """Split examples into shards whose row ranges start on chunk boundaries."""
    shards, row_base = [], 0
    for shard_id, start in enumerate(range(0, num_examples, shard_size)):
        stop = min(start + shard_size, num_examples)
        capacity = -(-(stop - start) * max_tokens // chunk_rows) * chunk_rows
        shards.append(ShardSpec(shard_id, start, stop, row_base, capacity))
        row_base += capacity
    return shards


class CacheRoot:
    """A directory of caches, addressed by key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key

    def partial_path(self, key: str) -> Path:
        _check_key(key)
        return self.root / PARTIAL_DIR / key

    def has(self, key: str) -> bool:
        return is_complete(self.path(key))

    def keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and is_complete(p))


def _check_key(key: str) -> None:
    # Keys become directory names: refuse anything that could climb out of the cache root.
    if not key or not all(c in "0123456789abcdef" for c in key):
        raise UniptError(f"cache key {key!r} is not a hex digest; cache keys come from `unipt run/extract`")


def is_complete(path: Path) -> bool:
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, json.JSONDecodeError):
        return False
    return bool(attrs.get("complete"))


class CacheBuilder:
    """Creates a partial store, records finished shards and commits the store atomically."""

    def __init__(self, cache_root: CacheRoot, key: str) -> None:
        self.cache_root = cache_root
        self.key = key
        self.path = cache_root.partial_path(key)

    def create(
        self,
        hidden_sizes: dict[int, int],
        shards: Sequence[ShardSpec],
        chunk_rows: int,
        dtype: str,
        compression_level: int,
        attrs: dict[str, Any],
    ) -> None:
        """Create the arrays, or keep an existing partial store with the same key and layout (resume).

        The row layout (shard plan, chunk rows, compression) is not part of the cache key, so a
        partial store laid out differently is discarded rather than mixed with new shards.
        """
        layout = {
            "plan_sha256": sha256_json(
                [[s.example_start, s.example_stop, s.row_base, s.row_capacity] for s in shards]
            ),
            "chunk_rows": chunk_rows,
            "compression_level": compression_level,
        }
        if (self.path / "zarr.json").is_file():
            existing = zarr.open_group(self.path, mode="r").attrs
            if existing.get("cache_key") == self.key and existing.get("layout") == layout:
                return
            shutil.rmtree(self.path)  # an unfinished store we cannot resume: start over
        self.path.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(self.path, mode="w", zarr_format=3)
        for layer, hidden in sorted(hidden_sizes.items()):
            group.create_array(
                name=layer_array_name(layer),
                shape=(shards[-1].row_base + shards[-1].row_capacity, hidden),
                chunks=(chunk_rows, hidden),
                dtype=_DTYPES[dtype],
                compressors=[BloscCodec(cname="zstd", clevel=compression_level, shuffle="shuffle")],
                fill_value=0,
            )
        group.attrs.update(
            {
                **attrs,
                "layout": layout,
                "cache_key": self.key,
                "format_version": FORMAT_VERSION,
                "complete": False,
            }
        )
        (self.path / SHARD_MARKERS).mkdir(exist_ok=True)

    def finished_shards(self) -> dict[int, list[int]]:
        """shard id -> token lengths of its examples, for every shard already written."""
        markers = self.path / SHARD_MARKERS
        if not markers.is_dir():
            return {}
        done = {}
        for marker in markers.glob("*.json"):
            done[int(marker.stem)] = json.loads(marker.read_text())["lengths"]
        return done

    def commit(
        self,
        shards: Sequence[ShardSpec],
        examples: pa.Table,
        attrs: dict[str, Any],
    ) -> Path:
        """Write offsets and metadata, mark complete, and move the store to its final name."""
        done = self.finished_shards()
        missing = [s.shard_id for s in shards if s.shard_id not in done]
        if missing:
            raise UniptError(f"cannot commit cache {self.key}: shards {missing[:5]} are not written yet")
        offsets = np.zeros((examples.num_rows, 2), dtype=np.int64)
        lengths = np.zeros(examples.num_rows, dtype=np.int32)
        for shard in shards:
            shard_lengths = np.asarray(done[shard.shard_id], dtype=np.int64)
            starts = shard.row_base + np.concatenate([[0], np.cumsum(shard_lengths)[:-1]])
            offsets[shard.example_start : shard.example_stop, 0] = starts
            offsets[shard.example_start : shard.example_stop, 1] = starts + shard_lengths
            lengths[shard.example_start : shard.example_stop] = shard_lengths
        group = zarr.open_group(self.path, mode="r+")
        group.create_array(name=OFFSETS, data=offsets, chunks=offsets.shape)
        table = examples.append_column("length", pa.array(lengths, pa.int32()))
        pq.write_table(table, self.path / EXAMPLES_FILE)
        shutil.rmtree(self.path / SHARD_MARKERS)
        group.attrs.update(
            {
                **attrs,
                "num_examples": int(examples.num_rows),
                "total_tokens": int(lengths.sum()),
                "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "complete": True,
            }
        )
        final = self.cache_root.path(self.key)
        if final.exists():
            # Another run committed the same key first; its content is the same by construction.
            shutil.rmtree(self.path)
            return final
        os.replace(self.path, final)
        return final


def write_shard(
    store_path: str | Path, shard: ShardSpec, layers: dict[int, np.ndarray], lengths: list[int]
) -> int:
    """Write one shard's packed token rows for every layer, then its marker. Returns bytes written.

    ``layers[l]`` holds the shard's tokens back to back, shape [sum(lengths), hidden_l].
    Called by extraction workers; each shard owns its rows, so workers never share a chunk.
    """
    store_path = Path(store_path)
    total = int(sum(lengths))
    if total > shard.row_capacity:
        raise UniptError(
            f"shard {shard.shard_id} has {total} tokens, more than its {shard.row_capacity} rows"
        )
    nbytes = 0
    for layer, rows in layers.items():
        if rows.shape[0] != total:
            raise ValueError(f"layer {layer}: {rows.shape[0]} rows for {total} tokens")
        array = zarr.open_array(store_path / layer_array_name(layer), mode="r+")
        array[shard.row_base : shard.row_base + total] = rows
        nbytes += rows.nbytes
    marker = store_path / SHARD_MARKERS / f"{shard.shard_id:06d}.json"
    tmp = marker.with_suffix(f".{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps({"lengths": [int(n) for n in lengths]}))
    os.replace(tmp, marker)  # the marker appears only after every layer's rows are on disk
    return nbytes


class CacheReader:
    """Read access to a committed cache: metadata, offsets, and token rows of chosen layers."""

    def __init__(self, path: str | Path, expect: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise UniptError(
                f"no activation cache at {self.path}; run `unipt extract` (or `unipt run`) first"
            )
        self.group = zarr.open_group(self.path, mode="r")
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        if not self.attrs.get("complete"):
            raise UniptError(
                f"cache {self.path} is incomplete (extraction did not finish); rerun `unipt extract`"
            )
        version = self.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise UniptError(
                f"cache {self.path} has format version {version}, this unipt reads {FORMAT_VERSION}; "
                "re-extract it"
            )
        if expect:
            self._check_expected(expect)
        self.layers: list[int] = [int(x) for x in self.attrs["layers"]]
        self.hidden_sizes: dict[int, int] = {int(k): int(v) for k, v in self.attrs["hidden_sizes"].items()}
        self.label_names: list[str] = list(self.attrs["label_names"])
        self.offsets: np.ndarray = self.group[OFFSETS][:]
        self.examples: pa.Table = pq.read_table(self.path / EXAMPLES_FILE)
        self._arrays: dict[int, zarr.Array] = {}

    def _check_expected(self, expect: dict[str, Any]) -> None:
        stored = self.attrs.get("key_fields", {})
        for field, wanted in expect.items():
            have = stored.get(field)
            if have != wanted:
                raise UniptError(
                    f"cache {self.path} was built for another {field.replace('_', ' ')} "
                    f"({_short(have)} != {_short(wanted)}); re-extract for this config"
                )

    @property
    def num_examples(self) -> int:
        return int(self.offsets.shape[0])

    def array(self, layer: int) -> zarr.Array:
        if layer not in self.hidden_sizes:
            raise UniptError(f"layer {layer} is not in cache {self.path} (stored layers: {self.layers})")
        if layer not in self._arrays:
            self._arrays[layer] = self.group[layer_array_name(layer)]
        return self._arrays[layer]

    def split_indices(self, split: str) -> np.ndarray:
        splits = self.examples.column("split").to_numpy(zero_copy_only=False)
        return np.flatnonzero(splits == split)

    def labels(self) -> np.ndarray:
        return self.examples.column("label").to_numpy()

    def read_rows(self, layer: int, start: int, stop: int) -> np.ndarray:
        return self.array(layer)[start:stop]

    def read_example(self, index: int, layer: int) -> np.ndarray:
        start, stop = self.offsets[index]
        return self.read_rows(layer, int(start), int(stop))

    def nbytes_on_disk(self) -> int:
        return directory_size(self.path)


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 16 else text[:12] + "..."
