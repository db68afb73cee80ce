"""Reading a dataset version (a *view*) through the segments of its activation space.

A view is a small store beside the caches (``<cache_root>/<key>/``: ``zarr.json``, ``examples.parquet``,
``checksums.json``, no arrays; the format is specified in ``docs/cache-format.md``). Its examples are in
the dataset's own order (split, then id), each naming the segment and the example row there that hold its
input's activations. :class:`ViewReader` presents exactly the API of a self-contained cache: example ``i``'s
rows of a layer are ``offsets_for(layer)[i]`` in a *virtual* row space where the view's examples sit back to
back, and ``read_rows`` maps a virtual range onto the segments' rows.

Why a virtual, gap-free row space: the loader cuts blocks where rows stop being back to back, and its
seeded shuffles depend only on the block sizes. Segments have gaps at their shard boundaries, in
places that depend on how the data arrived (one extraction, or several); the virtual space has none,
so a dataset version trains on exactly the same batches however its activations were extracted.

The order of that row space is ``train.view_order``: 2 (the default for training) puts each split's
examples in the order their inputs sit in the segments (segment, then row), which labels and ids do not
change, so a relabelled version reads its segments front to back like its source, and a partial one
reads only the chunks it uses, in order; 1 is the dataset's order as written (split, then id), which
runs made before 2 keep. Under 2 the batches follow where the inputs were stored, so a version
extracted incrementally batches differently from the same version extracted from scratch; under 1 they
are the same.

Reads stay block-contiguous: a virtual range whose rows are back to back in one segment (a
from-scratch extraction, away from shard boundaries) is one read, returned as is. Otherwise a segment
read out of memory maps (``extract.codec: none``, local) gives exactly the rows the range uses, in one
vectorised gather per chunk file, so a view of a quarter of a space copies a quarter of its rows; a
compressed segment's part of the range is cut into clusters of nearby rows (one read each, so a chunk is
decoded once per block, not once per example) and gathered into place.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.cache.attrs import SegmentRef
from unipt.pipeline.cache.checksums import CHECKSUMS_FILE, Problem, digest
from unipt.pipeline.cache.layout import SEGMENT_KIND, concat_ranges, layer_array_name, view_column
from unipt.pipeline.cache.locks import LeaseSet
from unipt.pipeline.cache.reader import CacheReader
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.errors import CacheMissing, UniptError
from unipt.pipeline.storage import Location

STORED_ORDER = 1  # ``train.view_order`` 1: the view's examples as written, the dataset's order (split, id)
SEGMENT_ORDER = 2  # ... 2: each split in the order its inputs sit in the segments (segment, then row)
VIEW_ORDERS = (STORED_ORDER, SEGMENT_ORDER)


def segment_row_order(examples: pa.Table) -> np.ndarray:
    """Positions of a view's examples split by split (in the order the splits first appear), each split
    in the order its inputs sit in the segments: segment, then row. Labels and example ids play no part,
    so a relabelled version of a dataset reads its segments front to back, like its source."""
    split = examples.column("split").to_numpy(zero_copy_only=False)
    _, first, codes = np.unique(split, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))[codes]
    segment = examples.column("segment").to_numpy()
    row = examples.column("row").to_numpy()
    return np.lexsort((row, segment, rank))


@dataclass(frozen=True)
class _Mapping:
    """Where each view example's rows of one offsets array sit: virtual [vstart, vstop), and in the
    segments (segment index, physical start)."""

    vstart: np.ndarray
    vstop: np.ndarray
    segment: np.ndarray
    pstart: np.ndarray


class _VirtualArray:
    """Shape and dtype of a view's virtual array (what the HDF5 export sizes its datasets by)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape = shape
        self.dtype = dtype


def parent_of(location: Location) -> Location:
    """The folder holding ``location`` (for a view: the cache root its segments are under)."""
    return Location(location.url.rstrip("/").rsplit("/", 1)[0], location.options)


def gather(
    segment: np.ndarray,
    physical: np.ndarray,
    counts: np.ndarray,
    fetch: Callable[[int, int, int], np.ndarray],
    gap: Callable[[int], int],
    take: Callable[[int, np.ndarray], np.ndarray | None] | None = None,
) -> np.ndarray:
    """Rows of many (segment, start, count) pieces back to back.

    ``take(segment, rows)``, where it gives rows (a memory-mapped segment), reads exactly the pieces' rows
    of that segment, in one gather. Otherwise the segment is read in few large runs (``fetch``): pieces at
    most ``gap(segment)`` rows apart are read as one run. The view reads with a gap below one chunk, so no
    run spans a chunk the view does not use: a partial view decodes only its own chunks."""
    total = int(counts.sum())
    targets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    out: np.ndarray | None = None
    indices = np.unique(segment)
    for index in indices:
        mine = np.flatnonzero(segment == index)
        taken = None if take is None else take(int(index), concat_ranges(physical[mine], counts[mine]))
        if taken is not None:
            if len(indices) == 1:
                return taken  # already in the view's order: no second copy
            if out is None:
                out = np.empty((total, *taken.shape[1:]), dtype=taken.dtype)
            out[concat_ranges(targets[mine], counts[mine])] = taken
            continue
        mine = mine[np.argsort(physical[mine], kind="stable")]
        begins, ends = physical[mine], physical[mine] + counts[mine]
        reach = np.maximum.accumulate(ends)
        cuts = np.flatnonzero(begins[1:] > reach[:-1] + gap(int(index))) + 1
        for part in np.split(np.arange(len(mine)), cuts):
            a, b = int(begins[part].min()), int(ends[part].max())
            rows = fetch(int(index), a, b)
            if out is None:
                out = np.empty((total, *rows.shape[1:]), dtype=rows.dtype)
            picked = mine[part]
            out[concat_ranges(targets[picked], counts[picked])] = rows[
                concat_ranges(begins[part] - a, counts[picked])
            ]
    assert out is not None
    return out


class ViewReader(ActivationCache):
    """A dataset version read through its activation space's segments, with the API of any
    :class:`~unipt.pipeline.cache.activation_cache.ActivationCache`.

    It holds readers, it is none of them: ``files`` reads the view's own store (``zarr.json``,
    ``examples.parquet``, ``checksums.json``), checked like any format-3+ store (sealed manifest, digests,
    attributes against the layout), and ``segments`` holds a :class:`~unipt.pipeline.cache.reader.CacheReader`
    per segment the view names (each with its own checks and read lease), each checked to be the very
    segment the view was written against (the digest of its ``checksums.json``). :meth:`close` lets go
    of all of them.
    """

    def __init__(
        self,
        target: str | Path | Location,
        expect: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        strict: bool = True,
        view_order: int = STORED_ORDER,
    ) -> None:
        if view_order not in VIEW_ORDERS:
            raise UniptError(
                f"view order {view_order} is not one of {list(VIEW_ORDERS)}; set train.view_order"
            )
        self.view_order = view_order
        self._examples: pa.Table | None = None
        self.files = CacheReader(target, expect, options, strict, view_files=True)
        self.location = self.files.location
        self.source = self.files.source
        self.strict = strict
        self.attrs = self.files.attrs
        self.segments: list[CacheReader] = []
        self._mappings: dict[str, _Mapping] = {}
        self._borrowed = False  # an augmented view's reader shares this one's segments and leases
        try:
            self._validate(None)  # the layout and what follows from it; ``files`` checked ``expect``
            self._specs = self.layout.arrays()
            self.space: str = self.meta.space_key or ""
            root = parent_of(self.location)
            for entry in self.meta.segments:
                self.segments.append(self._open_segment(root, entry, options, strict))
        except BaseException:
            self.close()
            raise
        self.lease = LeaseSet([self.files.lease, *(segment.lease for segment in self.segments)])

    def close(self) -> None:
        if self._borrowed:
            return  # the reader it was derived from owns the leases
        for reader in [self.files, *self.segments]:
            reader.close()

    def _open_segment(
        self, root: Location, entry: SegmentRef, options: dict[str, Any] | None, strict: bool
    ) -> CacheReader:
        location = CacheRoot(root).segment_location(self.space, entry.id)
        try:
            segment = CacheReader(location, options=options, strict=strict)
        except CacheMissing as exc:
            raise CacheMissing(
                f"cache {self.source} is a view over segment {entry.id} of activation space "
                f"{self.space}, which is not at {location}; run `unipt extract` for this config (it "
                "re-extracts only what is missing), or copy the whole cache root, not just the view"
            ) from exc
        try:
            if segment.meta.kind != SEGMENT_KIND or segment.meta.space_key != self.space:
                raise self._damaged("zarr.json", f"names {location} as a segment of its space, but it is not")
            if strict and (problem := _segment_problem(location, entry)):
                raise self._damaged(f"segment {entry.id}", problem)
        except BaseException:
            segment.close()
            raise
        return segment

    # --- the view's own files ------------------------------------------------------------------------------
    @property
    def examples(self) -> pa.Table:
        """The view's examples in its read order (``view_order``): every reading API follows it."""
        if self._examples is None:
            stored = self.files.examples
            ordered = self.view_order == STORED_ORDER
            self._examples = stored if ordered else stored.take(segment_row_order(stored))
        return self._examples

    def _loaded_examples(self) -> pa.Table | None:
        return None if self.files._loaded_examples() is None else self.examples

    def manifest(self) -> dict[str, Any] | None:
        return self.files.manifest()

    def checksums(self, missing_ok: bool = False) -> dict[str, str]:
        return self.files.checksums(missing_ok)

    # --- augmented views -----------------------------------------------------------------------------------
    def view(self, view: int) -> ViewReader:
        """This dataset version as read through augmented view ``view`` (:mod:`unipt.pipeline.data.augment`):
        the
        same examples, labels and splits, each example's rows those of its view, in a virtual row space
        of the view's own (gap-free too, so the loader's block plan is the same for every view). Shares
        this reader's segments and leases."""
        if view == self.view_index:
            return self
        if not 0 <= view < self.num_views:
            raise UniptError(
                f"cache {self.source} stores {self.num_views} view(s) per example, not view {view}; "
                "extract it with a larger extract.views"
            )
        other = copy.copy(self)
        other._borrowed = True
        other.view_index = view
        other._mappings, other._expected_offsets, other._offsets = {}, {}, {}
        return other

    def _column(self, name: str) -> str:
        return view_column(name, self.view_index)

    # --- the mapping ------------------------------------------------------------------------------------
    def _mapping(self, offsets_name: str) -> _Mapping:
        if offsets_name not in self._mappings:
            virtual = self.expected_offsets(offsets_name)
            if virtual is None:
                raise self._damaged("examples.parquet", "has no length column")
            spec = next(s for s in self.layout.layers if s.offsets_name == offsets_name)
            segment = self.examples.column(self._column("segment")).to_numpy().astype(np.int64)
            row = self.examples.column(self._column("row")).to_numpy().astype(np.int64)
            if len(row) and (row.min() < 0 or not 0 <= segment.min() <= segment.max() < len(self.segments)):
                raise self._damaged("examples.parquet", "points at a segment or row that does not exist")
            pstart = np.zeros(len(row), dtype=np.int64)
            for index, reader in enumerate(self.segments):
                mine = segment == index
                if not mine.any():
                    continue
                physical = reader.offsets_for(spec.index)
                if int(row[mine].max()) >= len(physical):
                    raise self._damaged("examples.parquet", f"points past the end of segment {index}")
                pstart[mine] = physical[row[mine], 0]
                lengths = physical[row[mine], 1] - physical[row[mine], 0]
                if not np.array_equal(lengths, virtual[mine, 1] - virtual[mine, 0]):
                    raise self._damaged(
                        "examples.parquet",
                        f"disagrees with segment {self.meta.segments[index].id} on token counts",
                    )
            self._mappings[offsets_name] = _Mapping(virtual[:, 0], virtual[:, 1], segment, pstart)
        return self._mappings[offsets_name]

    def _gather(self, offsets_name: str, start: int, stop: int, fetch: Any, take: Any = None) -> np.ndarray:
        """Virtual rows ``start:stop`` of an array laid out by ``offsets_name``; ``fetch(segment, lo,
        hi)`` reads physical rows of one segment, ``take(segment, rows)`` the rows at given indices (or
        None where that segment cannot, see :func:`gather`)."""
        segment, physical, counts = self._runs(offsets_name, start, stop)
        if len(counts) == 0:
            return fetch(0, 0, 0)
        if (one := _one_run(segment, physical, counts)) is not None:
            return fetch(*one)
        # Several runs: each segment read in few large pieces, gathered into the view's order.
        return gather(segment, physical, counts, fetch, lambda index: self.segments[index].read_gap, take)

    def stored_pieces(self, name: str, start: int, stop: int) -> list[tuple[int, np.ndarray]]:
        # Virtual rows that are one run of one segment are that segment's pieces (views into its maps).
        spec = self._specs.get(name)
        if spec is not None and spec.layer is not None:
            segment, physical, counts = self._runs(spec.layer.offsets_name, start, stop)
            if len(counts) and (one := _one_run(segment, physical, counts)) is not None:
                index, lo, hi = one
                pieces = self.segments[index].stored_pieces(name, lo, hi)
                return [(first - lo + start, rows) for first, rows in pieces]
        return super().stored_pieces(name, start, stop)

    def _runs(self, offsets_name: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Virtual rows ``start:stop`` as runs of physical rows: (segment, first physical row, rows) each."""
        m = self._mapping(offsets_name)
        first = int(np.searchsorted(m.vstop, start, side="right"))
        last = int(np.searchsorted(m.vstart, stop, side="left"))
        lo = np.maximum(m.vstart[first:last], start)
        hi = np.minimum(m.vstop[first:last], stop)
        keep = hi > lo
        lo, hi = lo[keep], hi[keep]
        segment = m.segment[first:last][keep]
        physical = m.pstart[first:last][keep] + (lo - m.vstart[first:last][keep])
        return segment, physical, hi - lo

    # --- the API training uses ----------------------------------------------------------------------------
    def offsets_for(self, layer: int) -> np.ndarray:
        name = self.layer_spec(layer).offsets_name
        offsets = self.expected_offsets(name)
        if offsets is None:
            raise self._damaged("examples.parquet", "has no length column")
        return offsets

    def read_rows(self, layer: int, start: int, stop: int) -> np.ndarray:
        spec = self.layer_spec(layer)
        return self._gather(
            spec.offsets_name,
            start,
            stop,
            lambda seg, lo, hi: self.segments[seg].read_rows(layer, lo, hi),
            lambda seg, rows: self.segments[seg].take_rows(layer, rows),
        )

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        spec = self._specs.get(name)
        if spec is None:
            raise UniptError(f"cache {self.source} has no array {name}")
        if spec.layer is None:  # an offsets array: the virtual one
            return self.offsets_for(next(s.index for s in self.layout.layers if s.offsets_name == name))[
                start:stop
            ]
        return self._gather(
            spec.layer.offsets_name,
            start,
            stop,
            lambda seg, lo, hi: self.segments[seg].read_stored(name, lo, hi),
            lambda seg, rows: self.segments[seg].take_stored(name, rows),
        )

    def stored_array(self, name: str) -> Any:
        spec = self._specs.get(name)
        if spec is None:
            raise UniptError(f"cache {self.source} has no array {name}")
        return _VirtualArray(spec.shape, spec.dtype)

    def array(self, layer: int) -> Any:
        return self.stored_array(layer_array_name(self.layer_spec(layer).index))

    def metadata_problems(self) -> list[Problem]:
        problems = []
        manifest = self.manifest()
        if manifest is None:
            problems.append(Problem(CHECKSUMS_FILE, CHECKSUMS_FILE, "file is missing or unreadable"))
        for problem in self.attribute_problems():
            problems.append(Problem("zarr.json", "zarr.json", f"contradicts itself: {problem}"))
        try:  # the view's examples table, judged against its layout before it is read (a resealed size lie)
            self.files.examples  # noqa: B018
        except UniptError as exc:
            problems.append(Problem("examples.parquet", "examples.parquet", str(exc)))
        for entry, segment in zip(self.meta.segments, self.segments, strict=False):
            if problem := _segment_problem(segment.location, entry):  # a segment resealed in place
                problems.append(Problem("zarr.json", f"segment {entry.id}", problem))
        return problems

    def root_digest(self) -> str | None:
        # The view's manifest seals its zarr.json, which names each segment's digest: one digest covers all.
        return self.files.root_digest()

    def nbytes_on_disk(self) -> int:
        """The view's files plus every segment it reads (segments may be shared with other views)."""
        return self.location.size() + sum(segment.nbytes_on_disk() for segment in self.segments)

    def own_bytes(self) -> int:
        return self.files.nbytes_on_disk()


def _segment_problem(location: Location, entry: SegmentRef) -> str | None:
    """Why the segment at ``location`` is not the one the view's ``entry`` names (by the digest of its
    checksums.json, which a view always records: without it a resealed segment would pass), or None."""
    if not entry.checksums:
        return "is named in the view's zarr.json without the digest of its checksums.json"
    try:
        raw = location.child(CHECKSUMS_FILE).read_bytes()
    except FileNotFoundError:
        return f"has no {CHECKSUMS_FILE}"
    if digest(raw) != entry.checksums:
        return "is not the segment this view was written against (its checksums differ)"
    return None


def _one_run(segment: np.ndarray, physical: np.ndarray, counts: np.ndarray) -> tuple[int, int, int] | None:
    """(segment, first, stop) where non-empty runs are back to back in one segment, else None."""
    if (segment == segment[0]).all() and np.array_equal(physical[1:], physical[:-1] + counts[:-1]):
        return int(segment[0]), int(physical[0]), int(physical[-1] + counts[-1])
    return None
