"""Where a store's metadata contradicts its root attributes: an array's ``zarr.json`` against the layout, and
``examples.parquet``'s footer against the number of examples. Both are judged before they size a read."""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from unipt.pipeline.cache.encoding import compressors, offsets_compressors
from unipt.pipeline.cache.layout import ArraySpec, StoreLayout


def array_problems(spec: ArraySpec, raw: bytes, layout: StoreLayout, version: int) -> list[str]:
    """Where an array's zarr.json contradicts what the cache attributes (its layout) say it must be."""
    try:
        meta = json.loads(raw)
        have = _array_summary(meta)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError, AttributeError) as exc:
        return [f"it is not readable array metadata ({type(exc).__name__})"]
    want = _expected_summary(spec, layout)
    fields = ["data_type", "shape", "file shape", "chunk shape"] + (["codecs"] if version >= 3 else [])
    return [f"{field} {have[field]} != {want[field]}" for field in fields if have[field] != want[field]]


def _array_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The fields of an array's zarr.json that the layout determines, in a comparable form."""
    if meta.get("node_type") != "array":
        raise TypeError("not an array")
    codecs = meta["codecs"]
    file_shape = list(meta["chunk_grid"]["configuration"]["chunk_shape"])
    chunk_shape = file_shape
    if codecs and codecs[0]["name"] == "sharding_indexed":
        chunk_shape = list(codecs[0]["configuration"]["chunk_shape"])
        codecs = codecs[0]["configuration"]["codecs"]
    return {
        "data_type": meta["data_type"],
        "shape": list(meta["shape"]),
        "file shape": file_shape,
        "chunk shape": chunk_shape,
        "codecs": [_codec_summary(codec) for codec in codecs if codec["name"] not in ("bytes", "transpose")],
    }


def _expected_summary(spec: ArraySpec, layout: StoreLayout) -> dict[str, Any]:
    chain = (
        offsets_compressors()
        if spec.layer is None
        else compressors(
            layout.codec,
            layout.shuffle,
            layout.compression_level,
            spec.dtype.itemsize,
            layout.blosc_blocksize,
        )
    )
    return {
        "data_type": spec.dtype.name,
        "shape": list(spec.shape),
        "file shape": list(spec.shards or spec.chunks),
        "chunk shape": list(spec.chunks),
        "codecs": [_codec_summary(codec.to_dict()) for codec in chain],
    }


def _codec_summary(codec: dict[str, Any]) -> str:
    # The name and the settings the layout chooses; not every key a Zarr version may add.
    config = codec.get("configuration") or {}
    chosen = ("cname", "clevel", "shuffle", "blocksize", "level", "acceleration")
    settings = ",".join(f"{key}={config[key]}" for key in chosen if key in config)
    return f"{codec['name']}({settings})" if settings else codec["name"]


# A parquet file of n bytes holds far fewer than this many rows per byte of a cache's examples table (every
# row has a hash or an id); more is a lie in its footer, which would size the read.
MAX_ROWS_PER_PARQUET_BYTE = 64


def examples_size_problem(data: bytes, num_examples: int) -> str | None:
    """Why ``examples.parquet`` (``data``) cannot be the table of a store of ``num_examples`` examples,
    judged from its footer alone, or None."""
    try:
        rows = pq.read_metadata(io.BytesIO(data)).num_rows
    except (pa.ArrowException, OSError) as exc:
        return f"is not a readable parquet file ({type(exc).__name__})"
    if rows > MAX_ROWS_PER_PARQUET_BYTE * len(data) + 1024:
        return f"claims {rows} rows in {len(data)} bytes"
    if rows != num_examples:
        return f"has {rows} rows, the layout {num_examples}"
    return None
