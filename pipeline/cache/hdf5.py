"""HDF5 copies of a cache: ``unipt cache export --format hdf5`` and a reader training can use.

The file holds the Zarr store's examples, so training on it gives the same batches and the
same numbers: datasets ``layer_NN`` (``layer_NN_scale`` for int8), ``offsets`` (and
``offsets_NN`` for feature maps), an ``examples`` group with one dataset per metadata column, and the
store's attributes as JSON in the file attribute ``unipt``. Only the rows examples use are written, one
shard's after the other, and the offsets say where they now are: the store's shards reserve rows they
never fill (a dataset of 28672 rows for 3976 used), which the file has no reason to keep. The export
reads through the reader's checks: a damaged chunk stops it with one line (and no output file), never
copies zeros or bad bytes.

The file checks itself too: every activation chunk carries HDF5's Fletcher-32 checksum (verified by HDF5
on every read; a mismatch stops training with one line), and the small datasets (offsets, the examples
columns) a sha256 in the attribute ``unipt_digests``, checked when the file is opened. A file exported
before that has neither: opening it says so (its reads are unchecked) and asks for a new export.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.cache.checksums import digest
from unipt.pipeline.cache.encoding import has_scale
from unipt.pipeline.cache.layout import layer_array_name, scale_array_name, written_ranges
from unipt.pipeline.cache.reader import CacheReader
from unipt.pipeline.errors import CacheDamaged, CacheMissing, UniptError
from unipt.pipeline.extras import require
from unipt.pipeline.hashing import sha256_json
from unipt.pipeline.log import say

ATTRS = "unipt"
DIGESTS = "unipt_digests"  # sha256 of each small dataset (offsets, examples columns), checked at open
# Set on a file whose rows are packed (:func:`_packed_rows`); a file exported before keeps the store's row
# positions, and its offsets are checked against those.
PACKED = "unipt_packed_rows"
EXAMPLES_GROUP = "examples"
COMPRESSIONS = ("none", "lzf", "gzip")
_WARNED_UNCHECKED: set[str] = set()  # files already said to be unchecked
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
    h5py = _h5py()
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs[ATTRS] = json.dumps(_exported_attrs(reader), sort_keys=True)
            digests = _write_layers(f, reader, compression, progress)
            digests.update(_write_examples(f, reader, h5py.string_dtype()))
            f.attrs[DIGESTS] = json.dumps(digests, sort_keys=True)
            f.attrs[PACKED] = True
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _exported_attrs(reader: CacheReader) -> dict[str, Any]:
    """The store's attributes as the file keeps them: it holds view 0's rows only, so it claims no more."""
    attrs = dict(reader.attrs)
    attrs.pop("views", None)
    if reader.num_views > 1:
        say(f"HDF5 export holds view 0 only; the {reader.num_views - 1} augmented view(s) stay in the cache")
    return attrs


def _write_layers(f: Any, reader: CacheReader, compression: str, progress: Any) -> dict[str, str]:
    """Every layer's (and int8 scale's) used rows, packed (:func:`_packed_rows`), and the offsets moved
    with them; returns the sha256 of each offsets dataset."""
    digests: dict[str, str] = {}
    for spec in reader.layout.layers:
        names = [layer_array_name(spec.index)]
        if has_scale(reader.dtype):
            names.append(scale_array_name(spec.index))
        copies, offsets = _packed_rows(reader.offsets_for(spec.index))
        if spec.offsets_name not in f:
            f.create_dataset(spec.offsets_name, data=offsets)
            digests[spec.offsets_name] = _digest(offsets)
        for name in names:
            _copy_rows(f, reader, name, copies, compression, progress)
    return digests


def _copy_rows(
    f: Any,
    reader: CacheReader,
    name: str,
    copies: list[tuple[int, int, int]],
    compression: str,
    progress: Any,
) -> None:
    """The stored array ``name``'s rows at ``copies`` into a new dataset ``name`` of ``f``, at most
    ``_COPY_ROWS`` rows at a time."""
    rows = sum(stop - start for start, stop, _ in copies)
    source = reader.stored_array(name)  # opened and read with the reader's checks
    target = f.create_dataset(
        name,
        shape=(rows, *source.shape[1:]),
        dtype=source.dtype,
        chunks=(max(1, min(reader.layout.chunk_rows, rows)), *source.shape[1:]) if rows else None,
        compression=None if compression == "none" or not rows else compression,
        fletcher32=bool(rows),  # a checksum per chunk, verified by HDF5 on every read
        fillvalue=0,
    )
    for start, stop, at in copies:
        for lo in range(start, stop, _COPY_ROWS):
            hi = min(lo + _COPY_ROWS, stop)
            target[at + lo - start : at + hi - start] = reader.read_stored(name, lo, hi)
            if progress is not None:
                progress(hi - lo)


def _write_examples(f: Any, reader: CacheReader, string_dtype: Any) -> dict[str, str]:
    """The examples table, one dataset per column in the ``examples`` group; returns each one's sha256."""
    digests: dict[str, str] = {}
    group = f.create_group(EXAMPLES_GROUP)
    for column in reader.examples.column_names:
        values = reader.examples.column(column)
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            data = values.to_pylist()
            group.create_dataset(column, data=data, dtype=string_dtype)
        else:
            data = values.to_numpy()
            group.create_dataset(column, data=data)
        digests[f"{EXAMPLES_GROUP}/{column}"] = _digest(data)
    return digests


class HDF5Damage(CacheDamaged):
    """A dataset of an HDF5 copy failed its checksum (or its decompression)."""


def verify_hdf5(path: str | Path) -> tuple[int, list[str]]:
    """(datasets checked, what is wrong): the examples columns and offsets against their sha256, every
    activation dataset read whole through HDF5's Fletcher-32 checks. A file that is no unipt cache at all,
    or one exported without checksums (nothing to verify against), raises."""
    h5py = _h5py()
    try:
        reader = HDF5CacheReader(path, warn_unchecked=False)  # checks the examples columns
    except HDF5Damage as exc:
        return 1, [str(exc)]
    try:
        if reader._digests is None:
            raise UniptError(
                f"{path} was exported without checksums (by an older unipt), so there is nothing to verify "
                "it against; export it again from the Zarr cache (`unipt cache export KEY --format hdf5`)"
            )
        names = sorted(name for name, item in reader.file.items() if isinstance(item, h5py.Dataset))
        problems = []
        for name in names:
            rows = reader.file[name].shape[0]
            # A dataset with a recorded sha256 (offsets: one row per example) is read whole, so it is checked.
            step = max(rows, 1) if name in reader._digests else _COPY_ROWS
            try:
                for start in range(0, max(rows, 1), step):
                    reader._read(name, start, min(start + step, rows))
            except HDF5Damage as exc:
                problems.append(str(exc))
        return len(names) + len(reader.file[EXAMPLES_GROUP]), problems
    finally:
        reader.close()


def _digest(data: np.ndarray | list[str]) -> str:
    """sha256 of a small dataset's values: an array's dtype, shape and bytes, or a list of strings."""
    if isinstance(data, list):
        return sha256_json(data)
    array = np.ascontiguousarray(data)
    return digest(f"{array.dtype.str}{array.shape}".encode() + array.tobytes())


def _packed_rows(offsets: np.ndarray) -> tuple[list[tuple[int, int, int]], np.ndarray]:
    """Where the layer's written rows (:func:`~unipt.pipeline.cache.layout.written_ranges`: each extraction
    shard's used rows) go in the file: ``(start, stop, file_start)`` per range, one after the other, and
    the examples' offsets moved there with them."""
    copies, at = [], 0
    for start, stop in written_ranges(offsets):
        copies.append((start, stop, at))
        at += stop - start
    return copies, _moved_offsets(offsets, copies)


def _moved_offsets(offsets: np.ndarray, copies: list[tuple[int, int, int]]) -> np.ndarray:
    """Each row position in ``offsets`` moved to the file: the number of copied rows before it (so an
    empty example points at an empty range where the rows before it end)."""
    if not copies:
        return np.zeros_like(offsets)
    starts, stops, ats = (np.array(column, dtype=np.int64) for column in zip(*copies, strict=True))
    which = np.searchsorted(starts, offsets, side="right") - 1  # the last copy starting at or before
    at = np.maximum(which, 0)
    moved = ats[at] + np.minimum(offsets - starts[at], stops[at] - starts[at])
    return np.where(which >= 0, moved, 0).astype(offsets.dtype, copy=False)


class HDF5CacheReader(ActivationCache):
    """A cache exported to HDF5, read with h5py; same API and same rows as :class:`CacheReader`."""

    def __init__(
        self, path: str | Path, expect: dict[str, Any] | None = None, warn_unchecked: bool = True
    ) -> None:
        self.path = Path(path).expanduser()
        self.source = str(self.path)
        if not self.path.is_file():
            raise CacheMissing(
                f"no HDF5 cache at {self.path}; create one with `unipt cache export --format hdf5`"
            )
        h5py = _h5py()
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise UniptError(f"{self.path} is not a readable HDF5 file ({exc})") from exc
        if ATTRS not in self.file.attrs:
            raise UniptError(f"{self.path} is an HDF5 file but not a unipt cache (no '{ATTRS}' attribute)")
        try:
            self.attrs = json.loads(self.file.attrs[ATTRS])
            self._digests = json.loads(self.file.attrs[DIGESTS]) if DIGESTS in self.file.attrs else None
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise self._damaged("its attributes", f"not readable JSON ({type(exc).__name__})") from exc
        if not isinstance(self.attrs, dict) or not isinstance(self._digests, dict | None):
            raise self._damaged("its attributes", "not the JSON objects unipt writes")
        if warn_unchecked and self._digests is None and self.source not in _WARNED_UNCHECKED:
            _WARNED_UNCHECKED.add(self.source)  # once per file and process: training opens it more than once
            say(
                f"warning: {self.path} was exported without checksums (by an older unipt): its reads are "
                "not verified; export it again (`unipt cache export ... --format hdf5`) for a checked copy"
            )
        self._validate(expect)
        group = self.file[EXAMPLES_GROUP]
        columns = {}
        for name in group:
            data = group[name]
            if data.shape != (self.layout.num_examples,):  # checked before the read it would size
                raise self._damaged(
                    f"{EXAMPLES_GROUP}/{name}",
                    f"has shape {list(data.shape)}, not [{self.layout.num_examples}]",
                )
            columns[name] = (
                [v.decode("utf-8") for v in data[:]] if h5py.check_string_dtype(data.dtype) else data[:]
            )
            self._check_digest(f"{EXAMPLES_GROUP}/{name}", columns[name])
        order = ["example_id", "label", "split", "length"]
        self.examples = pa.table({name: columns[name] for name in order if name in columns})

    def expected_offsets(self, name: str) -> np.ndarray | None:
        """The store's offsets, packed as the export packed them (a file exported before: as they were)."""
        expected = super().expected_offsets(name)
        if expected is None or not bool(self.file.attrs.get(PACKED, False)):
            return expected
        return _packed_rows(expected)[1]

    def _check_digest(self, name: str, data: np.ndarray | list) -> None:
        if self._digests is not None and self._digests.get(name) != _digest(data):
            raise self._damaged(name, "its sha256 does not match the one recorded at export")

    def _damaged(self, name: str, what: str) -> HDF5Damage:
        return HDF5Damage(
            f"HDF5 cache {self.path}: {name} is damaged ({what}); export it again from the Zarr cache "
            "(`unipt cache export KEY --format hdf5`)"
        )

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        try:
            rows = self.file[name][start:stop]
        except OSError as exc:  # HDF5 failed a chunk's Fletcher-32 checksum or its decompression
            raise self._damaged(f"{name} rows {start}-{stop}", str(exc).splitlines()[0]) from exc
        if start == 0 and name in (self._digests or {}) and stop >= self.file[name].shape[0]:
            self._check_digest(name, rows)  # a small dataset read whole (offsets)
        return rows

    def nbytes_on_disk(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        self.file.close()  # h5py: closing a closed file does nothing
