"""One extraction per cache key at a time, across processes on a machine or a shared filesystem.

A second ``unipt extract`` of a key that is being built waits for the first, then finds the
committed cache and returns it, instead of writing the same shards into the same partial store.
Object stores have no locks; there two concurrent builds of a key write identical bytes and the
commit is idempotent (the last writer publishes the same store), which is safe but wasteful.

Readers of a committed cache hold a shared :class:`ReadLease`; `unipt cache gc` removes a cache only
when it can take that lease exclusively (:func:`exclusive_if_free`), so it skips caches in use.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pipeline.storage import Location


@contextmanager
def exclusive(lock_file: Location, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_file`` (local paths; a no-op on object stores).

    The kernel drops the lock when the holder dies, even by ``kill -9``: no stale lock to clean up.
    """
    if not lock_file.is_local:
        yield
        return
    os.makedirs(os.path.dirname(lock_file.url), exist_ok=True)
    fd = os.open(lock_file.url, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _open_lock_file(lock_file: Location) -> int:
    os.makedirs(os.path.dirname(lock_file.url), exist_ok=True)
    return os.open(lock_file.url, os.O_RDWR | os.O_CREAT, 0o644)


@contextmanager
def exclusive_if_free(lock_file: Location) -> Iterator[bool]:
    """Take ``lock_file`` exclusively without waiting: yields False at once if anyone holds it.

    `unipt cache gc` removes a cache only inside this, so it never pulls a store out from under a
    reader holding a :class:`ReadLease` or an extraction holding its build lock. Object stores: True.
    """
    if not lock_file.is_local:
        yield True
        return
    fd = _open_lock_file(lock_file)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class ReadLease:
    """A shared lock held for as long as a cache is being read (e.g. by a training run).

    Readers share it; `unipt cache gc` needs it exclusively to remove the cache, so it skips a cache
    in use. Taking it waits only while a gc is removing that very cache (then the reader finds no cache
    and says so). The kernel drops it when the reader exits or dies. Best effort: where the lock file
    cannot be created (a read-only place, an object store) reading works without one.
    """

    def __init__(self, lock_file: Location | None) -> None:
        self._fd: int | None = None
        if lock_file is None or not lock_file.is_local:
            return
        try:
            fd = _open_lock_file(lock_file)
        except OSError:
            return
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __del__(self) -> None:
        self.release()
