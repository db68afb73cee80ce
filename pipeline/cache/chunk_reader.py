"""Reads that decode nothing: rows of an uncompressed local store copied straight out of memory maps.

A store written with ``extract.codec: none`` keeps each chunk as its raw little-endian rows followed by the
4-byte crc32c of those rows (Zarr v3's ``bytes`` then ``crc32c`` codecs). Such a chunk needs no decoding:
:class:`MappedArrays` maps each chunk file once (``mmap``, read-only) and a read is one slice copy per
chunk it touches, from the page cache into the caller's array. zarr-python's per-chunk pipeline (async
event loop, buffer prototypes, a fresh array per chunk, the checking store) cost ~10x the copy itself.

The checks stay those of the Zarr path (:class:`~unipt.pipeline.cache.checksums.ReadChecks`), each done once
per chunk file and reader, before any of its bytes is handed out:

- a chunk the layout says holds rows must exist (a missing one in reserved but unused rows reads as zeros,
  the arrays' fill value, exactly as through Zarr);
- the file's size and its last four bytes must be those ``checksums.json`` recorded for that position
  (a chunk moved, swapped or cut short is refused);
- the crc32c of its rows, computed by ``google_crc32c`` (the hardware instruction where the CPU has one:
  ~10 GB/s on one core), must equal its trailer.

A chunk file's (inode, size, mtime) is remembered with its verdict, so a file replaced while the reader
is open is checked again when it is next mapped. Files are opened with ``O_NOFOLLOW``: a chunk that is a
symlink is refused, never followed out of the store.

Only local stores with ``codec: none`` and one chunk per file take this path, and only for strict reads of
format-3+ stores (``unipt cache verify`` and older stores read through Zarr). Compressed codecs stay
available for slow disks and object stores, which always read through Zarr.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass

import google_crc32c
import numpy as np

from unipt.pipeline.cache.checksums import ChunkDamaged, ReadChecks
from unipt.pipeline.cache.layout import ArraySpec, StoreLayout
from unipt.pipeline.storage import Location

TRAILER_BYTES = 4  # the crc32c codec's trailer, little-endian uint32
# Chunk files kept mapped per reader: each map is one kernel mapping, and a process may hold ~65k in all
# (vm.max_map_count); 1024 maps of 3 MiB chunks cover 3 GiB of cache, more than a loader's working set.
MAX_MAPPED_FILES = 1024


def direct_reads(location: Location, layout: StoreLayout, checks: ReadChecks) -> MappedArrays | None:
    """A :class:`MappedArrays` for a store whose chunks can be read without decoding, else None."""
    if not location.is_local or layout.codec != "none" or layout.chunks_per_file != 1:
        return None
    if sys.byteorder != "little":  # the stored rows are little-endian; a big-endian host reads via Zarr
        return None
    return MappedArrays(location.url, checks)


@dataclass
class _Chunk:
    rows: np.ndarray | None  # [chunk_rows, ...] over the map; None for a file never written (fill value)
    stamp: tuple[int, int, int] | None  # (inode, size, mtime_ns) of the file whose crc32c was checked


class MappedArrays:
    """Rows of the layer (and scale) arrays of one local, uncompressed store, read through memory maps."""

    def __init__(self, folder: str, checks: ReadChecks) -> None:
        self.folder = folder
        self.checks = checks
        self._maps: OrderedDict[str, _Chunk] = OrderedDict()  # least recently used first
        self._verified: dict[str, tuple[int, int, int]] = {}  # chunk key -> stamp of the file checked
        self._lock = threading.Lock()

    def covers(self, spec: ArraySpec) -> bool:
        """Whether ``spec``'s array reads here: layer and scale arrays (offsets are read once, via Zarr)."""
        return spec.layer is not None

    def read(self, spec: ArraySpec, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``spec``'s array as stored, copied into ``out`` (or a new array)."""
        start, stop = max(0, start), min(max(start, stop), spec.shape[0])
        shape = (stop - start, *spec.shape[1:])
        if out is None:
            out = np.empty(shape, dtype=spec.dtype)
        elif out.shape != shape or out.dtype != spec.dtype:
            raise ValueError(f"out has shape {out.shape} {out.dtype}, the read gives {shape} {spec.dtype}")
        rows_per_file = spec.rows_per_file
        for index in range(start // rows_per_file, -(-stop // rows_per_file)):
            first = index * rows_per_file
            lo, hi = max(start, first), min(stop, first + rows_per_file)
            chunk = self._chunk(spec, index)
            if chunk is None:
                out[lo - start : hi - start] = 0
            else:
                out[lo - start : hi - start] = chunk[lo - first : hi - first]
        return out

    def pieces(self, spec: ArraySpec, start: int, stop: int) -> list[tuple[int, np.ndarray]]:
        """Rows ``start:stop`` of ``spec``'s array as ``(first row, rows)`` pieces, one per chunk file they
        touch: read-only views into its memory map (no copy), checked exactly as :meth:`read` checks them. A
        view keeps its map alive after the reader drops it, so a caller may hold it as long as it needs."""
        start, stop = max(0, start), min(max(start, stop), spec.shape[0])
        rows_per_file = spec.rows_per_file
        pieces = []
        for index in range(start // rows_per_file, -(-stop // rows_per_file)):
            first = index * rows_per_file
            lo, hi = max(start, first), min(stop, first + rows_per_file)
            chunk = self._chunk(spec, index)
            rows = (
                np.zeros((hi - lo, *spec.shape[1:]), spec.dtype)
                if chunk is None
                else chunk[lo - first : hi - first]
            )
            pieces.append((lo, rows))
        return pieces

    def take(self, spec: ArraySpec, rows: np.ndarray) -> np.ndarray:
        """The stored rows at indices ``rows`` (any order) of ``spec``'s array, copied out of the maps: only
        those rows, one vectorised gather per chunk file they touch (what a view reads of a segment)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= spec.shape[0]):
            raise IndexError(f"rows {rows.min()}-{rows.max()} of {spec.name} (rows 0-{spec.shape[0] - 1})")
        out = np.empty((len(rows), *spec.shape[1:]), dtype=spec.dtype)
        if len(rows) == 0:
            return out
        files = rows // spec.rows_per_file
        # Most gathers touch one file, or a few in order (a view under train.view_order 2): cut by runs of
        # one file rather than sorting.
        bounds = [0, *(np.flatnonzero(files[1:] != files[:-1]) + 1).tolist(), len(rows)]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=False):
            index = int(files[lo])
            chunk = self._chunk(spec, index)
            if chunk is None:
                out[lo:hi] = 0
            else:
                # mode "clip" (the rows were checked above, nothing is clipped): with "raise" numpy buffers
                # ``out`` and copies it twice, which made a quarter view's gather 4x slower than a slice copy.
                local = rows[lo:hi] - index * spec.rows_per_file
                np.take(chunk, local, axis=0, out=out[lo:hi], mode="clip")
        return out

    def close(self) -> None:
        """Drop every map (a read after this maps the files again; their verdicts are kept)."""
        with self._lock:
            self._maps.clear()

    # --- one chunk file -----------------------------------------------------------------------------------
    def _chunk(self, spec: ArraySpec, index: int) -> np.ndarray | None:
        key = f"{spec.name}/c/{index}" + "/0" * (len(spec.shape) - 1)
        with self._lock:
            chunk = self._maps.get(key)
            if chunk is not None:
                self._maps.move_to_end(key)
                return chunk.rows
        chunk = self._open(spec, key, index)  # outside the lock: a first check reads the whole file
        with self._lock:
            self._maps[key] = chunk
            if chunk.stamp is not None:
                self._verified[key] = chunk.stamp
            while len(self._maps) > MAX_MAPPED_FILES:
                self._maps.popitem(last=False)
        return chunk.rows

    def _open(self, spec: ArraySpec, key: str, index: int) -> _Chunk:
        path = os.path.join(self.folder, *key.split("/"))
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            if index in self.checks.files_with_rows.get(spec.name, ()) or key in self.checks.trailers:
                raise ChunkDamaged(key, "the chunk file is missing") from None
            return _Chunk(None, None)
        except OSError as exc:  # ELOOP: a symlink where a chunk file belongs
            raise ChunkDamaged(key, f"the chunk file cannot be opened ({exc.strerror})") from exc
        try:
            info = os.fstat(fd)
            stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
            body = spec.rows_per_file * int(np.prod(spec.shape[1:], dtype=np.int64)) * spec.dtype.itemsize
            if info.st_size != body + TRAILER_BYTES:
                raise ChunkDamaged(
                    key,
                    f"not the chunk written there: {info.st_size} bytes, {body + TRAILER_BYTES} expected "
                    "(cut short, moved or replaced)",
                )
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        data = np.frombuffer(mapped, dtype=np.uint8)
        trailer = data[body:].tobytes()
        ends = self.checks.trailers.get(key)
        if ends is not None and (max(ends) != info.st_size or ends.get(info.st_size) != trailer):
            raise ChunkDamaged(
                key, "not the chunk written there: its crc32c differs from checksums.json (moved or replaced)"
            )
        if self._verified.get(key) != stamp:
            if google_crc32c.value(data[:body]) != int.from_bytes(trailer, "little"):
                raise ChunkDamaged(key, "its crc32c checksum does not match its bytes")
        rows = np.frombuffer(mapped, dtype=spec.dtype.newbyteorder("<"), count=body // spec.dtype.itemsize)
        return _Chunk(rows.reshape(spec.rows_per_file, *spec.shape[1:]), stamp)
