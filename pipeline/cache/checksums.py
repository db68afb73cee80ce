"""The manifest of a cache (``checksums.json``): recorded as the bytes are written, checked on every read.

Zarr hands every encoded chunk to its store's ``set``; :class:`ChecksumRecorder` wraps the
store and hashes those exact bytes on the way through, so the digest describes what was
written, at no cost of reading anything back (which matters on object stores).

The manifest holds, per file, its sha256 (``files``: every chunk, every ``zarr.json`` and
``examples.parquet`` in a format-3 store; ``unipt cache verify`` re-hashes them all) and, per chunk
file, the crc32c its chunks end with (``trailers``, format 3). A chunk's crc32c (Zarr's codec) proves
its bytes are intact but not that they sit where they were written; :class:`CheckedStore` compares
the four trailer bytes of every chunk a read fetches with the manifest's entry for that position,
which costs a dict lookup, and refuses a missing chunk that the layout says holds rows. The manifest
seals itself with ``digest``, a sha256 of the rest, so an edit to it is caught too.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from zarr.abc.store import ByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from unipt.pipeline.storage import Location

ALGORITHM = "sha256"
CHECKSUMS_FILE = "checksums.json"
_CHUNK_KEY = re.compile(r"^(?P<array>[^/]+)/c/(?P<row>\d+)(?:/\d+)*$")
_EMPTY = 2**64 - 1  # a sharding index's offset for a chunk that was never written


def digest(data: bytes | memoryview | np.ndarray) -> str:
    return hashlib.sha256(data).hexdigest()


def chunk_key(key: str) -> tuple[str, int] | None:
    """(array, file index along rows) of a chunk file's store key; None for metadata and other files."""
    match = _CHUNK_KEY.match(key)
    return (match["array"], int(match["row"])) if match else None


def trailers_of(data: np.ndarray, chunks_per_file: int) -> list[list[Any]]:
    """[[end byte, last 4 bytes as hex], ...] of a chunk file: the file's own end, and with Zarr sharding
    (``chunks_per_file`` > 1) the end of every chunk inside it, from the index at the file's end (16
    bytes per chunk: offset and length, then the index's own crc32c)."""
    ends = {int(data.nbytes)}
    if chunks_per_file > 1:
        index = data[-(16 * chunks_per_file + 4) : -4].view("<u8").reshape(-1, 2)
        ends.update(int(offset + length) for offset, length in index if offset != _EMPTY)
    return [[end, bytes(data[end - 4 : end]).hex()] for end in sorted(ends)]


class ChecksumRecorder(WrapperStore):
    """A store wrapper that records the sha256 (and crc32c trailers) of every chunk file written through it.

    ``chunks_per_file`` names the arrays written with Zarr sharding, and how many chunks each file holds.
    """

    def __init__(
        self,
        store: Store,
        chunks_per_file: dict[str, int] | None = None,
        record: _Record | None = None,
    ) -> None:
        super().__init__(store)
        self.chunks_per_file = chunks_per_file or {}
        self.record = record or _Record()
        self.digests, self.sizes, self.trailers = self.record.digests, self.record.sizes, self.record.trailers

    def _with_store(self, store: Store) -> ChecksumRecorder:
        return type(self)(store, self.chunks_per_file, self.record)  # views of this store share one record

    async def set(self, key: str, value: Buffer) -> None:
        await self._store.set(key, value)
        located = chunk_key(key)
        if located is not None:  # metadata changes at commit, where it is hashed; here only chunk files
            data = value.as_numpy_array().view(np.uint8).reshape(-1)
            trailers = trailers_of(data, self.chunks_per_file.get(located[0], 1))
            with self.record.lock:
                self.digests[key] = digest(data)
                self.sizes[key] = int(data.nbytes)
                self.trailers[key] = trailers

    async def delete(self, key: str) -> None:
        await self._store.delete(key)
        with self.record.lock:
            self.digests.pop(key, None)
            self.sizes.pop(key, None)
            self.trailers.pop(key, None)


@dataclass
class _Record:
    digests: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    trailers: dict[str, list[list[Any]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


# --- the manifest ------------------------------------------------------------------------------------------


def seal(files: dict[str, str], trailers: dict[str, list[list[Any]]]) -> dict[str, Any]:
    """The manifest as written to ``checksums.json``, with the digest that seals it."""
    body = {
        "algorithm": ALGORITHM,
        "files": dict(sorted(files.items())),
        "trailers": dict(sorted(trailers.items())),
    }
    return {**body, "digest": _seal_digest(body)}


def _seal_digest(body: dict[str, Any]) -> str:
    return digest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def root_digest(manifest: dict[str, Any]) -> str:
    """A store's *root digest*: one sha256 over its manifest's content (every file's sha256 and every chunk
    trailer), so it changes with any byte of the store. A view's ``zarr.json`` names each segment with the
    digest of that segment's ``checksums.json``, so a view's root digest pins its segments as well.

    The manifest is unkeyed: whoever rewrites a store can reseal it. Run records and the registry keep the
    root digest of every cache a run read, so a cache changed after those runs no longer matches them
    (``docs/integrity.md``). For a sealed manifest this is its own ``digest``, recomputed here."""
    return _seal_digest({key: manifest.get(key) for key in ("algorithm", "files", "trailers")})


def stored_root_digest(location: Location) -> str | None:
    """The root digest of the store at ``location`` as its ``checksums.json`` says (None without one)."""
    try:
        manifest = json.loads(location.child(CHECKSUMS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return root_digest(manifest) if isinstance(manifest, dict) else None


def seal_problem(manifest: dict[str, Any]) -> str | None:
    """Why a (format 3) manifest cannot be trusted, or None when its seal holds."""
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("trailers"), dict):
        return "it has no files/trailers tables"
    body = {key: manifest.get(key) for key in ("algorithm", "files", "trailers")}
    if manifest.get("digest") != _seal_digest(body):
        return "it was edited after it was written (its digest does not match its content)"
    return None


# --- checks on read ----------------------------------------------------------------------------------------


class ChunkDamaged(Exception):
    """A chunk file a read fetched is missing or is not the one written there. Raised inside Zarr's read,
    caught by the reader, which turns it into a one-line :class:`~unipt.pipeline.errors.UniptError`."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass
class ReadChecks:
    """What a reader knows a store must hold: the files with rows per array, the trailers per chunk file."""

    files_with_rows: dict[str, set[int]] = field(default_factory=dict)  # filled as arrays are opened
    trailers: dict[str, dict[int, bytes]] = field(default_factory=dict)  # empty: no trailer checks

    def check(self, key: str, value: Buffer | None, byte_range: ByteRequest | None) -> None:
        located = chunk_key(key)
        if located is None:
            return
        if value is None:
            array, index = located
            if index in self.files_with_rows.get(array, ()) or key in self.trailers:
                raise ChunkDamaged(key, "the chunk file is missing")
            return
        ends = self.trailers.get(key)
        if ends is None:
            return
        size = max(ends)
        if byte_range is None:
            end = len(value)
            if end != size:
                raise ChunkDamaged(
                    key,
                    f"not the chunk written there: {end} bytes, {size} were written "
                    "(cut short, moved or replaced)",
                )
        elif isinstance(byte_range, SuffixByteRequest):
            end = size
        elif isinstance(byte_range, RangeByteRequest):
            end = byte_range.end
        else:
            return
        if len(value) < 4 or ends.get(end) != value.as_numpy_array()[-4:].tobytes():
            raise ChunkDamaged(
                key, "not the chunk written there: its crc32c differs from checksums.json (moved or replaced)"
            )


class CheckedStore(WrapperStore):
    """A read-only store wrapper that applies :class:`ReadChecks` to every chunk fetched."""

    def __init__(self, store: Store, checks: ReadChecks) -> None:
        super().__init__(store)
        self.checks = checks

    def _with_store(self, store: Store) -> CheckedStore:
        return type(self)(store, self.checks)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        self.checks.check(key, value, byte_range)
        return value

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, byte_range), value in zip(key_ranges, values, strict=True):
            self.checks.check(key, value, byte_range)
        return values


@dataclass(frozen=True)
class Problem:
    """One damaged or missing file in a cache."""

    file: str
    what: str  # e.g. "layer_03 chunk 5 (rows 20480-24575)"
    message: str

    def __str__(self) -> str:
        return f"{self.what}: {self.message}" + ("" if self.what == self.file else f" (file {self.file})")


def describe_file(key: str, rows_per_file: Callable[[str], int | None]) -> str:
    """A reader-facing name for a chunk file: its array, chunk index and row range."""
    located = chunk_key(key)
    if located is None:
        return key
    array, index = located
    rows = rows_per_file(array)
    if rows is None:
        return f"{array} chunk {index}"
    return f"{array} chunk {index} (rows {index * rows}-{(index + 1) * rows - 1})"


def verify_files(
    location: Location,
    expected: dict[str, str],
    rows_per_file: Callable[[str], int | None],
    progress: Callable[[int], None] | None = None,
    threads: int = 8,
) -> list[Problem]:
    """Re-hash every recorded file under ``location``; return what is missing or differs."""

    def check(item: tuple[str, str]) -> Problem | None:
        key, wanted = item
        what = describe_file(key, rows_per_file)
        try:
            data = location.child(*key.split("/")).read_bytes()
        except FileNotFoundError:
            return Problem(key, what, "file is missing")
        except OSError as exc:  # a directory, or no permission, where the file was written
            return Problem(key, what, f"cannot be read as a file ({exc.strerror or type(exc).__name__})")
        have = digest(data)
        if have != wanted:
            return Problem(key, what, f"checksum mismatch ({ALGORITHM} {have[:12]}... != {wanted[:12]}...)")
        return None

    problems: list[Problem] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for problem in pool.map(check, sorted(expected.items())):
            if progress is not None:
                progress(1)
            if problem is not None:
                problems.append(problem)
    return problems


def merge(records: Iterable[dict[str, str]]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for record in records:
        merged.update(record)
    return dict(sorted(merged.items()))
