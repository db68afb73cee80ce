"""Per-file checksums of a cache, recorded as the bytes are written and checked by ``unipt cache verify``.

Zarr hands every encoded chunk to its store's ``set``; :class:`ChecksumRecorder` wraps the
store and hashes those exact bytes on the way through, so the digest describes what was
written, at no cost of reading anything back (which matters on object stores).
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from zarr.abc.store import Store
from zarr.core.buffer import Buffer
from zarr.storage import WrapperStore

from pipeline.storage import Location

ALGORITHM = "sha256"
CHECKSUMS_FILE = "checksums.json"
_CHUNK_KEY = re.compile(r"^(?P<array>[^/]+)/c/(?P<row>\d+)(?:/\d+)*$")


def digest(data: bytes | memoryview | np.ndarray) -> str:
    return hashlib.sha256(data).hexdigest()


class ChecksumRecorder(WrapperStore):
    """A store wrapper that records the sha256 of every chunk file written through it."""

    def __init__(
        self, store: Store, digests: dict[str, str] | None = None, sizes: dict[str, int] | None = None
    ) -> None:
        super().__init__(store)
        self.digests: dict[str, str] = {} if digests is None else digests
        self.sizes: dict[str, int] = {} if sizes is None else sizes
        self._lock = threading.Lock()

    def _with_store(self, store: Store) -> ChecksumRecorder:
        return type(self)(store, self.digests, self.sizes)  # views of this store share one record

    async def set(self, key: str, value: Buffer) -> None:
        await self._store.set(key, value)
        if not key.endswith("zarr.json"):  # metadata changes at commit; only data files are recorded
            data = value.as_numpy_array()
            with self._lock:
                self.digests[key] = digest(data)
                self.sizes[key] = int(data.nbytes)

    async def delete(self, key: str) -> None:
        await self._store.delete(key)
        with self._lock:
            self.digests.pop(key, None)
            self.sizes.pop(key, None)


@dataclass(frozen=True)
class Problem:
    """One damaged or missing file in a cache."""

    file: str
    what: str  # e.g. "layer_03 chunk 5 (rows 20480-24575)"
    message: str

    def __str__(self) -> str:
        return f"{self.what}: {self.message} (file {self.file})"


def describe_file(key: str, rows_per_file: Callable[[str], int | None]) -> str:
    """A reader-facing name for a chunk file: its array, chunk index and row range."""
    match = _CHUNK_KEY.match(key)
    if not match:
        return key
    array, index = match["array"], int(match["row"])
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
