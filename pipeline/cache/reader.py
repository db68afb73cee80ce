"""Reading one Zarr store (a segment, or a cache of format 2 or 3) with every check: :class:`CacheReader`.

A cache root holds activation spaces of segments and dataset versions as views over them; the format
(layout, attributes, manifest, commit protocol, format versions) is specified in one place,
``docs/cache-format.md``. Here: the reader of one store. Elsewhere: the read API (:mod:`.activation_cache`),
the root and its folders (:mod:`.root`), the rows' layout (:mod:`.layout`) and encoding (:mod:`.encoding`),
reading a view through its segments (:mod:`.view`), writing (:mod:`.writer`, :mod:`.space`), and opening
whatever a path holds (:func:`unipt.pipeline.cache.opener.open_cache`).
"""

from __future__ import annotations

import io
import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from unipt.pipeline.cache.activation_cache import ActivationCache, failure_reason
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
from unipt.pipeline.cache.encoding import decode_rows, has_scale
from unipt.pipeline.cache.layout import (
    EXAMPLES_FILE,
    METADATA_FILE,
    VIEW_KIND,
    layer_array_name,
    scale_array_name,
)
from unipt.pipeline.cache.locks import ReadLease
from unipt.pipeline.cache.metadata_checks import array_problems, examples_size_problem
from unipt.pipeline.cache.root import SEGMENTS_DIR, SPACES_DIR, CacheRoot, is_key, read_root
from unipt.pipeline.errors import CacheDamaged, CacheMissing, UniptError
from unipt.pipeline.storage import Location


class CacheReader(ActivationCache):
    """A committed Zarr cache, local or remote. Opens a layer's array only when that layer is read.

    Every read is checked (format 3): each chunk's crc32c (Zarr's codec) and, through
    :class:`~unipt.pipeline.cache.checksums.CheckedStore`, that a chunk the layout says holds rows exists and
    is the one written at its position. At open, the manifest's seal and the digests of the root ``zarr.json``
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
            root = read_root(self.location)
            if root is None:
                raise CacheMissing(
                    f"no activation cache at {self.source}; run `unipt extract` (or `unipt run`) first"
                )
            self._root_bytes, self.attrs = root
            if self.meta.kind == VIEW_KIND and not view_files:
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
        so a view of part of a space copies no row it does not use. None where reads go through Zarr, which
        decodes whole chunks: read runs of rows there (:func:`unipt.pipeline.cache.view.gather`)."""
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
                    return f"{name} chunk {index} (rows {lo}-{hi - 1}): {failure_reason(failed)}"
        return failure_reason(exc)

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
