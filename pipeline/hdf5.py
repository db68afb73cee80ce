"""HDF5 copies of a cache: ``unipt cache export --format hdf5`` and a reader training can use.

The file mirrors the Zarr store one to one, so training on it gives the same batches and the
same numbers: datasets ``layer_NN`` (``layer_NN_scale`` for int8), ``offsets`` (and
``offsets_NN`` for feature maps) with the *same row positions* as the store, an ``examples``
group with one dataset per metadata column, and the store's attributes as JSON in the file
attribute ``unipt``. Only rows holding tokens are copied; HDF5, like Zarr, allocates no chunk
that is never written. The export reads through the reader's checks: a damaged chunk stops it with
one line (and no output file), never copies zeros or bad bytes.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.cache import ActivationCache, CacheReader
from pipeline.cache_layout import layer_array_name, scale_array_name
from pipeline.encoding import has_scale
from pipeline.errors import UniptError
from pipeline.extras import require
from pipeline.log import say

ATTRS = "unipt"
EXAMPLES_GROUP = "examples"
COMPRESSIONS = ("none", "lzf", "gzip")
_COPY_ROWS = 65536  # rows per copy step: bounded memory whatever the cache size


def _h5py() -> Any:
    """h5py, imported on use: it is the [hdf5] extra, and Zarr caches never need it."""
    require("h5py", "an HDF5 cache (.h5 file or `unipt cache export --format hdf5`)")
    import h5py

    return h5py


def export_hdf5(reader: CacheReader, out: str | Path, compression: str = "lzf", progress=None) -> Path:
    """Write ``reader``'s cache to an HDF5 file at ``out`` (atomically: a finished file or none)."""
    if compression not in COMPRESSIONS:
        raise UniptError(f"unknown HDF5 compression {compression!r}; choose one of {list(COMPRESSIONS)}")
    out = Path(out).expanduser().resolve()
    if out.exists():
        raise UniptError(f"{out} already exists; remove it or choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    layout = reader.layout
    h5py = _h5py()
    try:
        with h5py.File(tmp, "w") as f:
            attrs = dict(reader.attrs)
            if attrs.pop("views", 1) > 1:  # the file holds view 0's rows only: it must not claim more
                say(
                    f"HDF5 export holds view 0 only; the {reader.num_views - 1} augmented view(s) stay "
                    "in the cache"
                )
            f.attrs[ATTRS] = json.dumps(attrs, sort_keys=True)
            for spec in layout.layers:
                names = [layer_array_name(spec.index)]
                if has_scale(reader.dtype):
                    names.append(scale_array_name(spec.index))
                offsets = reader.offsets_for(spec.index)
                if spec.offsets_name not in f:
                    f.create_dataset(spec.offsets_name, data=offsets)
                for name in names:
                    source = reader.stored_array(name)  # opened and read with the reader's checks
                    target = f.create_dataset(
                        name,
                        shape=source.shape,
                        dtype=source.dtype,
                        chunks=(min(layout.chunk_rows, source.shape[0]), *source.shape[1:]),
                        compression=None if compression == "none" else compression,
                        fillvalue=0,
                    )
                    for start, stop in _used_row_ranges(layout, spec, offsets):
                        for lo in range(start, stop, _COPY_ROWS):
                            hi = min(lo + _COPY_ROWS, stop)
                            target[lo:hi] = reader.read_stored(name, lo, hi)
                            if progress is not None:
                                progress(hi - lo)
            group = f.create_group(EXAMPLES_GROUP)
            for column in reader.examples.column_names:
                values = reader.examples.column(column)
                if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
                    group.create_dataset(column, data=values.to_pylist(), dtype=h5py.string_dtype())
                else:
                    group.create_dataset(column, data=values.to_numpy())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _used_row_ranges(layout, spec, offsets: np.ndarray) -> list[tuple[int, int]]:
    """Per extraction shard, the rows its examples actually fill in this layer."""
    ranges = []
    for shard in layout.shards():
        part = offsets[shard.example_start : shard.example_stop]
        if len(part) and part[-1, 1] > part[0, 0]:
            ranges.append((int(part[0, 0]), int(part[-1, 1])))
    return ranges


class HDF5CacheReader(ActivationCache):
    """A cache exported to HDF5, read with h5py; same API and same rows as :class:`CacheReader`."""

    def __init__(self, path: str | Path, expect: dict[str, Any] | None = None) -> None:
        self.path = Path(path).expanduser()
        self.source = str(self.path)
        if not self.path.is_file():
            raise UniptError(
                f"no HDF5 cache at {self.path}; create one with `unipt cache export --format hdf5`"
            )
        h5py = _h5py()
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise UniptError(f"{self.path} is not a readable HDF5 file ({exc})") from exc
        if ATTRS not in self.file.attrs:
            raise UniptError(f"{self.path} is an HDF5 file but not a unipt cache (no '{ATTRS}' attribute)")
        self.attrs = json.loads(self.file.attrs[ATTRS])
        self._validate(expect)
        group = self.file[EXAMPLES_GROUP]
        columns = {}
        for name in group:
            data = group[name]
            columns[name] = (
                [v.decode("utf-8") for v in data[:]] if h5py.check_string_dtype(data.dtype) else data[:]
            )
        order = ["example_id", "label", "split", "length"]
        self.examples = pa.table({name: columns[name] for name in order if name in columns})

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.file[name][start:stop]

    def nbytes_on_disk(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        self.file.close()
