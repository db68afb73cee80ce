"""The activation cache: one Zarr v3 store per (dataset, backbone, settings) cache key.

Layout of ``<cache_root>/<key>/`` (the root is a local directory or an fsspec URL such as
``s3://bucket/caches``)::

    zarr.json            group attributes: format version, cache key and the fields hashed into it,
                         dataset fingerprint, backbone identity (name, revision, weights/config/tokenizer
                         sha256, model type), tokenizer, layer list, hidden sizes, feature-map grids,
                         dtype, max length, label names, counts, the store layout, ``complete: true``
    layer_00/ ...        one array per stored hidden state, [rows, width], chunked along rows
    layer_00_scale/ ...  (int8 stores only) float32 [rows]: each token's dequantization scale
    offsets/             int64 [num_examples, 2]: example i's tokens are rows offsets[i,0]:offsets[i,1]
                         of every token-sequence layer
    offsets_NN/          (feature-map layers only) the same for layer NN, whose H*W rows per example
                         differ from other layers'
    examples.parquet     per-example metadata: example_id, label, split, length
    checksums.json       sha256 of every data file, recorded as it was written (`unipt cache verify`)

Row layout, dtypes and codecs: see :mod:`pipeline.cache_layout` and :mod:`pipeline.encoding`.

A cache becomes visible only when complete. Locally it is built under
``<cache_root>/.partial/<key>/`` with a marker per finished shard (an interrupted build resumes
from them) and renamed to ``<cache_root>/<key>`` in one step. Object stores have no rename, so
there the store is built in place and ``complete: true`` in ``zarr.json``, written last, is the
commit. Either way readers refuse a store that is incomplete, from another format version, or
built for another dataset or backbone, and :class:`CacheRoot` lists only complete stores.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from pipeline import FORMAT_VERSION
from pipeline.cache_layout import (
    EXAMPLES_FILE,
    METADATA_FILE,
    LayerSpec,
    StoreLayout,
    layer_array_name,
    scale_array_name,
)
from pipeline.checksums import CHECKSUMS_FILE
from pipeline.encoding import decode_rows, has_scale
from pipeline.errors import UniptError
from pipeline.locks import ReadLease
from pipeline.storage import Location

PARTIAL_DIR = ".partial"
LEASES_DIR = ".leases"


def check_key(key: str) -> None:
    # Keys become directory names: refuse anything that could climb out of the cache root.
    if not key or len(key) > 64 or not all(c in "0123456789abcdef" for c in key):
        raise UniptError(f"cache key {key!r} is not a hex digest; cache keys come from `unipt run/extract`")


class CacheRoot:
    """A directory (or bucket prefix) of caches, addressed by key."""

    def __init__(self, root: str | Path | Location, options: dict[str, Any] | None = None) -> None:
        self.root = root if isinstance(root, Location) else Location(root, options)

    def __str__(self) -> str:
        return str(self.root)

    def location(self, key: str) -> Location:
        check_key(key)
        return self.root.child(key)

    def partial_location(self, key: str) -> Location:
        """Where the store for ``key`` is built: beside the root locally, in place on object stores."""
        check_key(key)
        return self.root.child(PARTIAL_DIR, key) if self.root.is_local else self.root.child(key)

    def lock_location(self, key: str) -> Location:
        """The lock file that serializes builds of ``key`` (see :mod:`pipeline.locks`)."""
        check_key(key)
        return self.root.child(PARTIAL_DIR, f"{key}.lock")

    def lease_location(self, key: str) -> Location:
        """The lock file readers of ``key`` hold shared and gc takes exclusively (:mod:`pipeline.locks`)."""
        check_key(key)
        return self.root.child(LEASES_DIR, f"{key}.lock")

    def has(self, key: str) -> bool:
        return is_complete(self.location(key))

    def keys(self) -> list[str]:
        return [name for name in self.root.listdir() if is_key(name) and is_complete(self.root.child(name))]

    def partial_keys(self) -> list[str]:
        """Keys of stores that exist but are not committed (interrupted or running extractions)."""
        if self.root.is_local:
            return [name for name in self.root.child(PARTIAL_DIR).listdir() if is_key(name)]
        return [name for name in self.root.listdir() if is_key(name) and not self.has(name)]


def is_key(name: str) -> bool:
    return 0 < len(name) <= 64 and all(c in "0123456789abcdef" for c in name)


def read_attrs(location: Location) -> dict[str, Any] | None:
    """The group attributes of the store at ``location``, or None if there is no readable store."""
    try:
        meta = json.loads(location.child(METADATA_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta.get("attributes", {}) if isinstance(meta, dict) else None


def is_complete(location: Location) -> bool:
    attrs = read_attrs(location)
    return bool(attrs and attrs.get("complete"))


class ActivationCache:
    """Read access to a committed cache; subclasses supply the storage (Zarr store or HDF5 file)."""

    source: str
    attrs: dict[str, Any]
    examples: pa.Table

    def _validate(self, expect: dict[str, Any] | None) -> None:
        if not self.attrs.get("complete"):
            raise UniptError(
                f"cache {self.source} is incomplete (extraction did not finish); rerun `unipt extract`"
            )
        version = self.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise UniptError(
                f"cache {self.source} has format version {version}, this unipt reads {FORMAT_VERSION}; "
                "re-extract it"
            )
        stored = self.attrs.get("key_fields", {})
        for field, wanted in (expect or {}).items():
            have = stored.get(field)
            if have != wanted:
                raise UniptError(
                    f"cache {self.source} was built for another {field.replace('_', ' ')} "
                    f"({_short(have)} != {_short(wanted)}); re-extract for this config"
                )
        self.layout = StoreLayout.from_json(self.attrs["layout"])
        self.dtype: str = self.layout.dtype
        self.layers: list[int] = [spec.index for spec in self.layout.layers]
        self.hidden_sizes: dict[int, int] = {spec.index: spec.width for spec in self.layout.layers}
        self.label_names: list[str] = list(self.attrs["label_names"])
        self._offsets: dict[str, np.ndarray] = {}

    # --- storage hooks ------------------------------------------------------------------------------------
    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def _read_all(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def nbytes_on_disk(self) -> int:
        raise NotImplementedError

    # --- the API training uses ----------------------------------------------------------------------------
    @property
    def num_examples(self) -> int:
        return int(self.examples.num_rows)

    @property
    def offsets(self) -> np.ndarray:
        """Row ranges of the first stored layer's tokens (all token-sequence layers share them)."""
        return self.offsets_for(self.layers[0])

    def layer_spec(self, layer: int) -> LayerSpec:
        if layer not in self.hidden_sizes:
            raise UniptError(f"layer {layer} is not in cache {self.source} (stored layers: {self.layers})")
        return self.layout.layer(layer)

    def offsets_for(self, layer: int) -> np.ndarray:
        name = self.layer_spec(layer).offsets_name
        if name not in self._offsets:
            self._offsets[name] = self._read_all(name)
        return self._offsets[name]

    def read_rows(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a layer, decoded (float16 for fp16 caches, float32 otherwise)."""
        self.layer_spec(layer)
        try:
            stored = self._read(layer_array_name(layer), start, stop)
            scale = self._read(scale_array_name(layer), start, stop) if has_scale(self.dtype) else None
        except UniptError:
            raise
        except Exception as exc:  # a codec error here means damaged bytes, not a bug in the caller
            raise UniptError(
                f"cache {self.source}: {layer_array_name(layer)} rows {start}-{stop} could not be read "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                f"run `unipt cache verify {self.source}` and re-extract if it is damaged"
            ) from exc
        return decode_rows(stored, self.dtype, scale)

    def read_example(self, index: int, layer: int) -> np.ndarray:
        """One example's rows of a layer; a feature-map layer comes back as [H, W, C]."""
        start, stop = self.offsets_for(layer)[index]
        rows = self.read_rows(layer, int(start), int(stop))
        grid = self.layer_spec(layer).grid
        return rows.reshape(grid[0], grid[1], -1) if grid else rows

    def split_indices(self, split: str) -> np.ndarray:
        splits = self.examples.column("split").to_numpy(zero_copy_only=False)
        return np.flatnonzero(splits == split)

    def labels(self) -> np.ndarray:
        return self.examples.column("label").to_numpy()


class CacheReader(ActivationCache):
    """A committed Zarr cache, local or remote. Opens a layer's array only when that layer is read."""

    def __init__(
        self,
        target: str | Path | Location,
        expect: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.location = target if isinstance(target, Location) else Location(target, options)
        self.source = str(self.location)
        # Taken before anything is read: from here on `unipt cache gc` leaves this cache alone.
        self.lease = _read_lease(self.location)
        attrs = read_attrs(self.location)
        if attrs is None:
            self.lease.release()
            raise UniptError(
                f"no activation cache at {self.source}; run `unipt extract` (or `unipt run`) first"
            )
        self.attrs = attrs
        self._validate(expect)
        self.group = zarr.open_group(store=self.location.zarr_store(read_only=True), mode="r")
        self._examples: pa.Table | None = None
        self._arrays: dict[str, zarr.Array] = {}

    @property
    def examples(self) -> pa.Table:
        # Loaded on first use, so `unipt cache verify` can still report on a store whose table is damaged.
        if self._examples is None:
            try:
                data = self.location.child(EXAMPLES_FILE).read_bytes()
                self._examples = pq.read_table(io.BytesIO(data))
            except (FileNotFoundError, pa.ArrowException) as exc:
                raise UniptError(
                    f"cache {self.source}: {EXAMPLES_FILE} is missing or damaged ({type(exc).__name__}); "
                    f"run `unipt cache verify {self.source}` and re-extract"
                ) from exc
        return self._examples

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._array(name)[start:stop]

    def _read_all(self, name: str) -> np.ndarray:
        return self._array(name)[:]

    def array(self, layer: int) -> zarr.Array:
        self.layer_spec(layer)
        return self._array(layer_array_name(layer))

    def checksums(self) -> dict[str, str]:
        try:
            return json.loads(self.location.child(CHECKSUMS_FILE).read_text())["files"]
        except FileNotFoundError as exc:
            raise UniptError(f"cache {self.source} has no {CHECKSUMS_FILE}; it cannot be verified") from exc

    def nbytes_on_disk(self) -> int:
        return self.location.size()


def _read_lease(location: Location) -> ReadLease:
    """A lease for a store that sits in a cache root under its key; none for other paths (gc never
    touches those), so opening a cache by an arbitrary path creates no lock files beside it."""
    if location.is_local and is_key(location.name) and os.path.isdir(location.url):
        return ReadLease(CacheRoot(os.path.dirname(location.url)).lease_location(location.name))
    return ReadLease(None)


def open_cache(
    target: str | Path | Location,
    expect: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> ActivationCache:
    """A reader for a Zarr cache directory/URL or an exported HDF5 file (``.h5``/``.hdf5``)."""
    if str(target).endswith((".h5", ".hdf5")):
        from pipeline.hdf5 import HDF5CacheReader

        return HDF5CacheReader(target, expect=expect)
    return CacheReader(target, expect=expect, options=options)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 16 else text[:12] + "..."
