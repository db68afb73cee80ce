"""The activation cache: activation spaces of segments, and dataset versions as views over them.

Format 4. A backbone runs once per *input*, not once per dataset version. Under ``<cache_root>/`` (a
local directory or an fsspec URL such as ``s3://bucket/caches``)::

    spaces/<space>/space.json        an activation space: what decides an activation's bytes (backbone
                                     identity, layers, max length, preprocessing, dtype, autocast, format
                                     version; :func:`unipt.pipeline.cache.identity.space_key`), nothing about
                                     labels,
                                     ids or splits
    spaces/<space>/segments/<id>/    a segment: one Zarr store written exactly like a format-3 cache
                                     (below), whose examples are *inputs*: ``examples.parquet`` holds
                                     ``input_hash, length`` (the sha256 of exactly what the backbone read:
                                     :func:`unipt.pipeline.data.table.input_hashes`); each input is stored
                                     once
    <key>/                           a view: one dataset version (``key`` is the cache key, which hashes
                                     the dataset fingerprint with the space's fields). ``zarr.json`` (a group
                                     with no arrays) holds the attributes a cache always had plus ``kind:
                                     view``, ``space_key`` and ``segments`` (each id with the digest of its
                                     ``checksums.json``, so a replaced segment is refused);
                                     ``examples.parquet`` holds ``example_id, label, split, length,
                                     input_hash, segment, row`` in the dataset's order (split, then id):
                                     example i's activations are example ``row`` of segment ``segment``;
                                     with augmented views (``views: K`` attribute) also ``length_k,
                                     input_hash_k, segment_k, row_k`` for k = 1..K-1 (see
                                     :mod:`unipt.pipeline.data.augment`);
                                     ``checksums.json`` seals both. A few KiB to MiB, written in seconds.
    <key>/ (format 2 or 3)           a cache from before spaces: read as one segment with one view, never
                                     rewritten

A segment (and a format-3 cache) is laid out as::

    zarr.json            group attributes: format version, kind, the key fields, backbone identity (name,
                         revision, weights/config/tokenizer sha256, model type), tokenizer, layer list,
                         hidden sizes, feature-map grids, dtype, max length, counts, the store layout
                         (shard plan, chunking, codec), ``complete: true``
    layer_00/ ...        one array per stored hidden state, [rows, width], chunked along rows
    layer_00_scale/ ...  (int8 stores only) float32 [rows]: each token's dequantization scale
    offsets/             int64 [num_examples, 2]: example i's tokens are rows offsets[i,0]:offsets[i,1]
                         of every token-sequence layer
    offsets_NN/          (feature-map layers only) the same for layer NN, whose H*W rows per example
                         differ from other layers'
    examples.parquet     per-example metadata (a segment: input_hash, length; format 3: example_id,
                         label, split, length)
    checksums.json       the manifest: sha256 of every file (chunks, every zarr.json, examples.parquet)
                         and each chunk file's crc32c trailer, recorded as written, sealed by its own
                         digest (`unipt cache verify`; format-3+ reads check against it too)

Row layout, dtypes and codecs: see :mod:`unipt.pipeline.cache.layout` and
:mod:`unipt.pipeline.cache.encoding`.
Reading through a view: :mod:`unipt.pipeline.cache.view` (a gap-free virtual row space, so a version trains
on the same batches however its inputs were extracted). Spaces, views, compaction:
:mod:`unipt.pipeline.cache.space`.

Incremental extraction (``extract/runner.py``), under the space's build lock: the inputs of the version
that no segment holds are extracted into one new segment (its id hashes the space and those inputs,
so a rerun after a crash resumes the same partial store), then the view is written. A relabelled or
re-split version extracts nothing.

A store becomes visible only when complete. Locally a segment is built under
``<cache_root>/.partial/<id>/`` with a marker per finished shard (an interrupted build resumes from
them) and renamed into place in one step; a view is written beside the root and renamed into place.
Object stores have no rename, so there both are built in place and ``complete: true`` in
``zarr.json``, written last, is the commit. Either way readers refuse a store that is incomplete,
from another format version, or built for another dataset or backbone, and :class:`CacheRoot` lists
only complete stores. Read leases (``.leases/<key or segment>.lock``) keep `unipt cache gc` and
``unipt cache compact`` from removing a view or segment being read.

Every read of a format-3+ store is checked (see :class:`CacheReader`): a damaged, missing or
displaced chunk, or metadata that contradicts the attributes, stops the read with one line naming
the array, chunk and rows and pointing at ``unipt cache verify``.
:func:`unipt.pipeline.cache.opener.open_cache`
opens a path that may be a view (:class:`~unipt.pipeline.cache.view.ViewReader`), a segment or format-2/3
cache (:class:`CacheReader`) or an HDF5 export; every reader is a context manager whose ``close()``
lets go of its read leases.

Migration from format 3: nothing is converted. Format-3 caches stay readable by key or path (`unipt
train --cache`, `verify`, `export`, reruns of the runs that used them) and are kept by gc while a run
uses them. The format version is part of the cache key, so a config first run after upgrading extracts
its inputs once more, into a space; from then on new versions of the data reuse them.
"""

from __future__ import annotations

import io
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from unipt.pipeline import READABLE_FORMAT_VERSIONS
from unipt.pipeline.cache.checksums import (
    CHECKSUMS_FILE,
    CheckedStore,
    ChunkDamaged,
    Problem,
    ReadChecks,
    describe_file,
    digest,
    root_digest,
    seal_problem,
)
from unipt.pipeline.cache.chunk_reader import direct_reads
from unipt.pipeline.cache.encoding import compressors, decode_rows, has_scale, offsets_compressors
from unipt.pipeline.cache.layout import (
    EXAMPLES_FILE,
    METADATA_FILE,
    VIEW_KIND,
    ArraySpec,
    LayerSpec,
    StoreLayout,
    layer_array_name,
    scale_array_name,
)
from unipt.pipeline.cache.locks import ReadLease
from unipt.pipeline.errors import CacheDamaged, CacheMissing, UniptError
from unipt.pipeline.storage import Location

T = TypeVar("T")

PARTIAL_DIR = ".partial"
LEASES_DIR = ".leases"
TRASH_DIR = ".trash"  # what gc and compact move aside before deleting it
SPACES_DIR = "spaces"
SEGMENTS_DIR = "segments"
SPACE_FILE = "space.json"


def check_key(key: str) -> None:
    # Keys become directory names: refuse anything that could climb out of the cache root.
    if not is_key(key):
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
        """The lock file that serializes builds of ``key`` (see :mod:`unipt.pipeline.cache.locks`)."""
        check_key(key)
        return self.root.child(PARTIAL_DIR, f"{key}.lock")

    def lease_location(self, key: str) -> Location:
        """The lock file readers of ``key`` hold shared and gc takes exclusively
        (:mod:`unipt.pipeline.cache.locks`)."""
        check_key(key)
        return self.root.child(LEASES_DIR, f"{key}.lock")

    def space_location(self, space: str) -> Location:
        """An activation space: ``space.json`` and its segments (see the module docstring)."""
        check_key(space)
        return self.root.child(SPACES_DIR, space)

    def segment_location(self, space: str, segment: str) -> Location:
        check_key(segment)
        return self.space_location(space).child(SEGMENTS_DIR, segment)

    def spaces(self) -> list[str]:
        return sorted(name for name in self.root.child(SPACES_DIR).listdir() if is_key(name))

    def segments(self, space: str) -> list[str]:
        """Committed segments of ``space``, oldest first (by commit time, then id)."""
        folder = self.space_location(space).child(SEGMENTS_DIR)
        found = []
        for name in folder.listdir():
            attrs = read_attrs(folder.child(name)) if is_key(name) else None
            if attrs and attrs.get("complete"):
                found.append((str(attrs.get("committed_at", "")), name))
        return [name for _, name in sorted(found)]

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
    root = _read_root(location)
    return root[1] if root else None


def _read_root(location: Location) -> tuple[bytes, dict[str, Any]] | None:
    """The root ``zarr.json`` as bytes (for its checksum) and its attributes, or None."""
    try:
        raw = location.child(METADATA_FILE).read_bytes()
        meta = json.loads(raw)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("attributes", {}), dict):
        return None
    return raw, meta.get("attributes", {})


def is_complete(location: Location) -> bool:
    attrs = read_attrs(location)
    return bool(attrs and attrs.get("complete"))


class ActivationCache(ABC):
    """Read access to a committed cache: the interface training, export and the admin commands use.

    Modelled on zarr-python's ``Store(ABC)``: the implementations supply the storage (:meth:`_read`,
    :meth:`nbytes_on_disk`, :meth:`close`) and everything derived from the attributes and the examples
    table (offsets, layers, splits, decoding) is written once here. Implementations:
    :class:`CacheReader` (one Zarr store: a segment, or a cache of format 2/3),
    :class:`unipt.pipeline.cache.view.ViewReader` (a dataset version, holding the readers of its segments) and
    :class:`unipt.pipeline.cache.hdf5.HDF5CacheReader`. :func:`unipt.pipeline.cache.opener.open_cache` picks
    one.

    A reader holds a read lease (or an open file) until :meth:`close`; use it as a context manager.
    """

    source: str
    attrs: dict[str, Any]
    examples: pa.Table

    view_index: int = (
        0  # which augmented view this reader reads (unipt.pipeline.data.augment); 0: the inputs as is
    )

    @property
    def num_views(self) -> int:
        """Augmented views stored per example (``extract.views``); 1 for caches without them."""
        return int(self.attrs.get("views", 1))

    def view(self, view: int) -> ActivationCache:
        """This cache as read through augmented view ``view`` (same examples, labels and splits; each
        example's rows are those of its view). View 0 is this reader; only a dataset version's view over
        an activation space stores more (:class:`ViewReader`)."""
        if view != 0:
            raise UniptError(f"cache {self.source} stores no augmented view {view} (it has 1 view)")
        return self

    def _column(self, name: str) -> str:
        """The examples.parquet column ``name`` of the view this reader reads."""
        return name

    def _validate(self, expect: dict[str, Any] | None) -> None:
        if not self.attrs.get("complete"):
            raise CacheMissing(
                f"cache {self.source} is incomplete (extraction did not finish); rerun `unipt extract`"
            )
        version = self.attrs.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise UniptError(
                f"cache {self.source} has format version {version}, this unipt reads versions "
                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}; re-extract it"
            )
        self.format_version: int = int(version)
        stored = self.attrs.get("key_fields", {})
        for field, wanted in (expect or {}).items():
            have = stored.get(field)
            if have != wanted:
                raise UniptError(
                    f"cache {self.source} was built for another {field.replace('_', ' ')} "
                    f"({_short(have)} != {_short(wanted)}); re-extract for this config"
                )
        try:
            self.layout = StoreLayout.from_json(self.attrs["layout"])
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise self._damaged("zarr.json", f"its layout attribute is unreadable ({exc})") from exc
        except UniptError as exc:  # numbers no real cache has: refused before they size anything
            raise self._damaged("zarr.json", f"is not to be trusted: {str(exc).split(';')[0]}") from exc
        self.dtype: str = self.layout.dtype
        self.layers: list[int] = [spec.index for spec in self.layout.layers]
        self.hidden_sizes: dict[int, int] = {spec.index: spec.width for spec in self.layout.layers}
        self.label_names: list[str] = list(self.attrs.get("label_names", []))
        self._offsets: dict[str, np.ndarray] = {}
        self._expected_offsets: dict[str, np.ndarray] = {}

    def _damaged(self, what: str, why: str) -> CacheDamaged:
        return CacheDamaged(
            f"cache {self.source}: {what} {why}; run `unipt cache verify {self.source}` and re-extract it"
        )

    def attribute_problems(self) -> list[str]:
        """Where the root attributes contradict their own layout (or, once loaded, the examples table)."""
        layout, attrs = self.layout, self.attrs
        claims = {
            "dtype": (attrs.get("dtype"), layout.dtype),
            "layers": (attrs.get("layers"), [s.index for s in layout.layers]),
            "hidden_sizes": (attrs.get("hidden_sizes"), {str(s.index): s.width for s in layout.layers}),
            "grids": (attrs.get("grids", {}), {str(s.index): list(s.grid) for s in layout.layers if s.grid}),
            "max_length": (attrs.get("max_length"), layout.max_length),
            "num_examples": (attrs.get("num_examples"), layout.num_examples),
        }
        problems = [
            f"attribute {name} is {_short(have)} but the layout says {_short(want)}"
            for name, (have, want) in claims.items()
            if have != want
        ]
        examples = self._loaded_examples()
        if examples is None and getattr(self, "_examples_problem", None):
            problems.append(f"{EXAMPLES_FILE} {self._examples_problem}")
        if examples is not None:
            if examples.num_rows != layout.num_examples:
                problems.append(
                    f"examples.parquet has {examples.num_rows} rows, the layout {layout.num_examples}"
                )
            elif "length" in examples.column_names:
                total = int(pc.sum(examples.column("length")).as_py() or 0)
                if total != attrs.get("total_tokens"):
                    problems.append(
                        f"examples.parquet lengths sum to {total}, attribute total_tokens is "
                        f"{attrs.get('total_tokens')}"
                    )
        return problems

    def _loaded_examples(self) -> pa.Table | None:
        return self.examples

    def root_digest(self) -> str | None:
        """The store's root digest (:func:`unipt.pipeline.cache.checksums.root_digest`); None where there is
        none."""
        return None

    # --- storage hooks ------------------------------------------------------------------------------------
    @abstractmethod
    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the stored array ``name``, as stored."""

    def _locate_damage(self, name: str, start: int, stop: int, exc: Exception) -> str:
        """What exactly failed in a read of rows ``start:stop`` of array ``name`` (for the error line)."""
        return _reason(exc)

    @abstractmethod
    def nbytes_on_disk(self) -> int:
        """Bytes this cache occupies (a view: its own files and every segment it reads)."""

    # --- lifetime -----------------------------------------------------------------------------------------
    @abstractmethod
    def close(self) -> None:
        """Let go of the read lease(s) or the open file; idempotent. Reads after it are undefined."""

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

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

    def expected_offsets(self, name: str) -> np.ndarray | None:
        """The offsets array ``name`` as the layout and examples.parquet's lengths determine it (None for an
        examples table without lengths): what the stored one must equal, and where rows must exist."""
        if name not in self._expected_offsets:
            if self._column("length") not in self.examples.column_names:
                return None
            spec = next(s for s in self.layout.layers if s.offsets_name == name)
            lengths = self.examples.column(self._column("length")).to_numpy()
            most = self.layout.max_length
            if spec.grid is None and len(lengths) and not (0 <= lengths.min() and lengths.max() <= most):
                raise self._damaged(EXAMPLES_FILE, f"has a length outside 0-{most} (the rows per example)")
            self._expected_offsets[name] = self.layout.offsets(spec, lengths)
        return self._expected_offsets[name]

    def offsets_for(self, layer: int) -> np.ndarray:
        name = self.layer_spec(layer).offsets_name
        if name not in self._offsets:
            offsets = self.read_stored(name, 0, self.layout.num_examples)
            expected = self.expected_offsets(name)
            if expected is not None and not np.array_equal(offsets, expected):
                if offsets.shape != expected.shape:
                    why = f"has shape {list(offsets.shape)}, expected {list(expected.shape)}"
                else:
                    bad = int(np.flatnonzero((offsets != expected).any(axis=1))[0])
                    why = f"example {bad}: rows {offsets[bad].tolist()}, expected {expected[bad].tolist()}"
                raise self._damaged(name, f"does not match the lengths in {EXAMPLES_FILE} ({why})")
            self._offsets[name] = offsets
        return self._offsets[name]

    def read_stored(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a stored array as stored (no decoding); damage is one clear error."""
        return self._checked_read(self._read, name, start, stop)

    def stored_pieces(self, name: str, start: int, stop: int) -> list[tuple[int, np.ndarray]]:
        """Rows ``start:stop`` of a stored array as stored, as ``(first row, rows)`` pieces that cover the
        range in order. Where a store is read out of memory maps (:mod:`unipt.pipeline.cache.chunk_reader`)
        each piece
        is a read-only view into one chunk file's map, so the rows are copied once, by the caller, straight
        to where they go (the loader's padded batch); elsewhere one piece, read as :meth:`read_stored` reads.
        """
        return [(start, self.read_stored(name, start, stop))]

    def _checked_read(self, read: Callable[[str, int, int], T], name: str, start: int, stop: int) -> T:
        """``read(name, start, stop)``, any failure but a UniptError turned into one CacheDamaged line."""
        try:
            return read(name, start, stop)
        except UniptError:
            raise
        except (
            Exception
        ) as exc:  # a codec or checksum error here means damaged bytes, not a bug in the caller
            raise self._damaged_read(name, start, stop, exc) from exc

    def _damaged_read(self, name: str, start: int, stop: int, exc: Exception) -> CacheDamaged:
        return CacheDamaged(
            f"cache {self.source}: {name} rows {start}-{stop} could not be read "
            f"({self._locate_damage(name, start, stop, exc)}); "
            f"run `unipt cache verify {self.source}` and re-extract if it is damaged"
        )

    def read_rows(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a layer, decoded (float16 for fp16 caches, float32 otherwise)."""
        self.layer_spec(layer)
        stored = self.read_stored(layer_array_name(layer), start, stop)
        scale = self.read_stored(scale_array_name(layer), start, stop) if has_scale(self.dtype) else None
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
    """A committed Zarr cache, local or remote. Opens a layer's array only when that layer is read.

    Every read is checked (format 3): each chunk's crc32c (Zarr's codec) and, through
    :class:`~unipt.pipeline.cache.checksums.CheckedStore`, that a chunk the layout says holds rows exists and
    is the
    one written at its position. At open, the manifest's seal and the digests of the root ``zarr.json``
    and ``examples.parquet`` are checked, and the root attributes against their layout; each array's
    ``zarr.json`` is checked (digest, dtype, shape, chunking, codecs) when the array is first opened.
    Version 2 caches get the metadata cross-checks only; ``unipt cache verify`` is their check.
    ``strict=False`` skips all of it, for ``unipt cache verify`` to report on a damaged store.
    """

    def __init__(
        self,
        target: str | Path | Location,
        expect: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        strict: bool = True,
        *,
        view_files: bool = False,
    ) -> None:
        self.location = target if isinstance(target, Location) else Location(target, options)
        self.source = str(self.location)
        self.strict = strict
        # Taken before anything is read: from here on `unipt cache gc` leaves this cache alone.
        self.lease: ReadLease = _read_lease(self.location)
        self._examples: pa.Table | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._manifest: dict[str, Any] | None = None  # set at open for strict format-3 reads
        self.checks = ReadChecks()
        try:
            root = _read_root(self.location)
            if root is None:
                raise CacheMissing(
                    f"no activation cache at {self.source}; run `unipt extract` (or `unipt run`) first"
                )
            self._root_bytes, self.attrs = root
            if self.attrs.get("kind") == VIEW_KIND and not view_files:
                # A view's arrays live in its segments: read alone, its store would look empty.
                raise UniptError(
                    f"cache {self.source} is a view over an activation space; open it with "
                    "unipt.pipeline.cache.opener.open_cache, which reads it through its segments"
                )
            self._validate(expect)
            self._specs = self.layout.arrays()
            if strict:
                self._check_at_open()
        except BaseException:
            self.lease.release()
            raise
        store = CheckedStore(self.location.zarr_store(read_only=True), self.checks)
        self.group = zarr.open_group(store=store, mode="r")
        # Uncompressed local stores read straight out of memory maps, with the same checks (chunk_reader).
        self._mapped = direct_reads(self.location, self.layout, self.checks) if self.checked else None

    def close(self) -> None:
        self.lease.release()

    @property
    def read_gap(self) -> int:
        """Unused rows a view may read between two runs it needs rather than read them apart: less than a
        chunk, the unit Zarr decodes, so a view never decodes a chunk it has no row in."""
        return self.layout.chunk_rows - 1

    def take_stored(self, name: str, rows: np.ndarray) -> np.ndarray | None:
        """The stored rows at indices ``rows`` (any order) of array ``name``, and only those, where the store
        reads out of memory maps (:mod:`unipt.pipeline.cache.chunk_reader`): what a view reads of a segment,
        so a view
        of part of a space copies no row it does not use. None where reads go through Zarr, which decodes
        whole chunks: read runs of rows there (:func:`unipt.pipeline.cache.view.gather`)."""
        spec = self._specs.get(name)
        if spec is None or self._mapped is None or not self._mapped.covers(spec):
            return None
        self._array(name)  # checked when first opened, as on every other read path
        try:
            return self._mapped.take(spec, rows)
        except Exception as exc:  # damaged bytes: the same one line as a range read's
            lo, hi = (int(rows.min()), int(rows.max()) + 1) if len(rows) else (0, 0)
            raise self._damaged_read(name, lo, hi, exc) from exc

    def take_rows(self, layer: int, rows: np.ndarray) -> np.ndarray | None:
        """A layer's rows at indices ``rows``, decoded like :meth:`read_rows`; None as :meth:`take_stored`."""
        self.layer_spec(layer)
        stored = self.take_stored(layer_array_name(layer), rows)
        if stored is None:
            return None
        scale = None
        if has_scale(self.dtype):
            scale = self.take_stored(scale_array_name(layer), rows)
            if scale is None:
                return None
        return decode_rows(stored, self.dtype, scale)

    @property
    def checked(self) -> bool:
        """Whether reads check chunk checksums and presence (format 3 and strict)."""
        return self.strict and self.format_version >= 3

    def _check_at_open(self) -> None:
        manifest = None
        if self.format_version >= 3:
            manifest = self.manifest()
            if manifest is None:
                raise self._damaged(CHECKSUMS_FILE, "is missing (format 3 reads check against it)")
            problem = seal_problem(manifest)
            if problem:
                raise self._damaged(CHECKSUMS_FILE, f"cannot be trusted: {problem}")
            self._check_digest(manifest, METADATA_FILE, self._root_bytes)
            self.checks.trailers = {
                key: {int(end): bytes.fromhex(crc) for end, crc in ends}
                for key, ends in manifest["trailers"].items()
            }
        self._manifest = manifest
        problems = self.attribute_problems()  # loads examples.parquet, checking its digest
        if problems:
            raise self._damaged(METADATA_FILE, f"contradicts itself: {problems[0]}")

    def _check_digest(self, manifest: dict[str, Any], name: str, data: bytes) -> None:
        wanted = manifest["files"].get(name)
        if wanted is None:
            raise self._damaged(name, f"is not in {CHECKSUMS_FILE}")
        if digest(data) != wanted:
            raise self._damaged(name, f"differs from its checksum in {CHECKSUMS_FILE} (edited or damaged)")

    def root_digest(self) -> str | None:
        # A strict reader's manifest is the one whose seal and digests were checked at open.
        manifest = self._manifest if self._manifest is not None else self.manifest()
        return root_digest(manifest) if manifest is not None else None

    def manifest(self) -> dict[str, Any] | None:
        """checksums.json as written (None when missing or unreadable)."""
        try:
            manifest = json.loads(self.location.child(CHECKSUMS_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None

    @property
    def examples(self) -> pa.Table:
        # Loaded on first use, so `unipt cache verify` can still report on a store whose table is damaged.
        if self._examples is None:
            try:
                data = self.location.child(EXAMPLES_FILE).read_bytes()
                if self.strict and self._manifest is not None:
                    self._check_digest(self._manifest, EXAMPLES_FILE, data)
                self._examples_problem = examples_size_problem(data, self.layout.num_examples)
                if self._examples_problem:  # before the table is read: its row count sizes the read
                    raise self._damaged(EXAMPLES_FILE, self._examples_problem)
                self._examples = pq.read_table(io.BytesIO(data))
            except (FileNotFoundError, pa.ArrowException) as exc:
                raise CacheDamaged(
                    f"cache {self.source}: {EXAMPLES_FILE} is missing or damaged ({type(exc).__name__}); "
                    f"run `unipt cache verify {self.source}` and re-extract"
                ) from exc
        return self._examples

    def _loaded_examples(self) -> pa.Table | None:
        if self.strict:
            return self.examples
        try:
            return self.examples
        except UniptError:
            return None  # verify reports the table through its checksum

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            if self.strict:
                self._check_array(name)
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def _check_array(self, name: str) -> None:
        """Before the first read of an array: its zarr.json against the manifest and the attributes, and
        (format 3) which of its files must exist."""
        spec = self._specs.get(name)
        if spec is None:
            raise UniptError(f"cache {self.source} has no array {name}")
        meta_name = f"{name}/{METADATA_FILE}"
        try:
            raw = self.location.child(name, METADATA_FILE).read_bytes()
        except FileNotFoundError as exc:
            raise self._damaged(meta_name, "is missing") from exc
        problems = array_problems(spec, raw, self.layout, self.format_version)
        if problems:
            raise self._damaged(meta_name, f"does not match the cache attributes: {problems[0]}")
        if self._manifest is not None:
            self._check_digest(self._manifest, meta_name, raw)
        if self.checked:
            files: set[int] = {0}  # an offsets array: its one chunk
            if spec.layer is not None:
                expected = self.expected_offsets(spec.layer.offsets_name)
                files = set() if expected is None else self.layout.files_with_rows(spec, expected)
            self.checks.files_with_rows[name] = files

    def metadata_problems(self) -> list[Problem]:
        """Everything wrong with the store's metadata, for ``unipt cache verify`` (never raises)."""
        problems = []
        manifest = self.manifest()
        if manifest is None:
            problems.append(Problem(CHECKSUMS_FILE, CHECKSUMS_FILE, "file is missing or unreadable"))
        elif self.format_version >= 3 and (problem := seal_problem(manifest)):
            problems.append(Problem(CHECKSUMS_FILE, CHECKSUMS_FILE, problem))
        for problem in self.attribute_problems():
            problems.append(Problem(METADATA_FILE, METADATA_FILE, f"contradicts itself: {problem}"))
        for name, spec in self._specs.items():
            meta_name = f"{name}/{METADATA_FILE}"
            try:
                raw = self.location.child(name, METADATA_FILE).read_bytes()
            except FileNotFoundError:
                problems.append(Problem(meta_name, meta_name, "file is missing"))
                continue
            for problem in array_problems(spec, raw, self.layout, self.format_version):
                problems.append(
                    Problem(meta_name, meta_name, f"does not match the cache attributes: {problem}")
                )
        return problems

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        array = self._array(name)  # checked when first opened, whichever path then reads it
        if self._mapped is not None and self._mapped.covers(self._specs[name]):
            return self._mapped.read(self._specs[name], start, stop)
        return array[start:stop]

    def stored_pieces(self, name: str, start: int, stop: int) -> list[tuple[int, np.ndarray]]:
        if self._mapped is None or name not in self._specs or not self._mapped.covers(self._specs[name]):
            return super().stored_pieces(name, start, stop)
        return self._checked_read(self._mapped_pieces, name, start, stop)

    def _mapped_pieces(self, name: str, start: int, stop: int) -> list[tuple[int, np.ndarray]]:
        self._array(name)  # checked when first opened, as for _read
        return self._mapped.pieces(self._specs[name], start, stop)

    def _locate_damage(self, name: str, start: int, stop: int, exc: Exception) -> str:
        # A checksum failure does not say which chunk; a read that failed is rare, so find it by
        # reading the range again one file at a time.
        rows_per_file = self._specs[name].rows_per_file if name in self._specs else None
        describe = partial(describe_file, rows_per_file=lambda _: rows_per_file)
        if isinstance(exc, ChunkDamaged):
            return f"{describe(exc.key)}: {exc.reason}"
        if rows_per_file and stop > start and name in self._arrays:
            array = self._arrays[name]
            for index in range(start // rows_per_file, (stop - 1) // rows_per_file + 1):
                lo, hi = index * rows_per_file, min((index + 1) * rows_per_file, array.shape[0])
                try:
                    array[lo:hi]
                except ChunkDamaged as damaged:
                    return f"{describe(damaged.key)}: {damaged.reason}"
                except Exception as failed:
                    return f"{name} chunk {index} (rows {lo}-{hi - 1}): {_reason(failed)}"
        return _reason(exc)

    def array(self, layer: int) -> zarr.Array:
        self.layer_spec(layer)
        return self._array(layer_array_name(layer))

    def stored_array(self, name: str) -> zarr.Array:
        """An array of the store by name, opened with the same checks as a layer read."""
        return self._array(name)

    def checksums(self, missing_ok: bool = False) -> dict[str, str]:
        manifest = self.manifest()
        if manifest is None:
            if missing_ok:
                return {}
            raise UniptError(f"cache {self.source} has no readable {CHECKSUMS_FILE}; it cannot be verified")
        return manifest["files"]

    def nbytes_on_disk(self) -> int:
        return self.location.size()


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


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, ValueError) and "checksum do not match" in text:
        return "its crc32c checksum does not match its bytes"
    return f"{type(exc).__name__}: {text}"


def _read_lease(location: Location) -> ReadLease:
    """A lease for a store that sits in a cache root under its key; none for other paths (gc never
    touches those), so opening a cache by an arbitrary path creates no lock files beside it."""
    if location.is_local and is_key(location.name) and os.path.isdir(location.url):
        parent = os.path.dirname(location.url)
        if os.path.basename(parent) == SEGMENTS_DIR:  # <root>/spaces/<space>/segments/<segment>
            root = os.path.dirname(os.path.dirname(os.path.dirname(parent)))
            if os.path.basename(os.path.dirname(os.path.dirname(parent))) == SPACES_DIR:
                return ReadLease(CacheRoot(root).lease_location(location.name))
        return ReadLease(CacheRoot(parent).lease_location(location.name))
    return ReadLease(None)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 16 else text[:12] + "..."
