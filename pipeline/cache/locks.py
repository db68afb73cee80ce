"""One extraction per cache key at a time, across processes on a machine or a shared filesystem.

A second ``unipt extract`` of a key that is being built waits for the first, then finds the
committed cache and returns it, instead of writing the same shards into the same partial store.
Object stores have no locks; there two concurrent builds of a key write identical bytes and the
commit is idempotent (the last writer publishes the same store), which is safe but wasteful.

Readers of a committed cache hold a shared :class:`ReadLease`; `unipt cache gc` removes a cache only
when it can take that lease exclusively (:func:`exclusive_if_free`), so it skips caches in use.

Lock files do not pile up: whoever holds one exclusively when letting go (a finished build, gc, the
last reader of a cache) deletes it first. That is safe because every taker, after its ``flock``
succeeds, checks that the file it locked is still the one at the path, and starts over if not: a
process that opened the file just before it was deleted never believes it holds the lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

from unipt.pipeline.errors import UniptError
from unipt.pipeline.storage import Location


def _open_lock_file(path: str) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        # O_NOFOLLOW: a link planted at a lock file's name must not make us create or lock (and, letting
        # go, delete) a file elsewhere.
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise UniptError(
            f"lock file {path} is a symbolic link; unipt's lock files are plain files it creates itself: "
            "remove the link"
        ) from None


def _still_at(fd: int, path: str) -> bool:
    """Whether ``fd`` is the file now at ``path`` (not one a releasing holder has deleted)."""
    try:
        linked = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (linked.st_dev, linked.st_ino) == (mine.st_dev, mine.st_ino)


def _lock(path: str, operation: int, on_wait: Callable[[], None] | None = None) -> int | None:
    """``flock`` the file at ``path``: its descriptor, or None when ``LOCK_NB`` and someone holds it."""
    waited = False
    while True:
        fd = _open_lock_file(path)
        try:
            try:
                fcntl.flock(fd, operation | fcntl.LOCK_NB)
            except BlockingIOError:
                if operation & fcntl.LOCK_NB:
                    os.close(fd)
                    return None
                if on_wait is not None and not waited:
                    on_wait()
                waited = True
                fcntl.flock(fd, operation)
        except BaseException:
            os.close(fd)
            raise
        if _still_at(fd, path):
            return fd
        os.close(fd)  # deleted by the holder we waited for: lock the file now at the path instead


def _unlock(fd: int, path: str, delete: bool) -> None:
    """Let go of a lock; ``delete`` (only while holding it exclusively) removes the file first."""
    try:
        if delete:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    finally:
        os.close(fd)  # closing the descriptor drops the lock


@contextmanager
def exclusive(lock_file: Location, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_file`` (local paths; a no-op on object stores).

    The kernel drops the lock when the holder dies, even by ``kill -9`` (the empty file left then is
    harmless; gc sweeps it). Otherwise the file is deleted on the way out.
    """
    if not lock_file.is_local:
        yield
        return
    fd = _lock(lock_file.url, fcntl.LOCK_EX, on_wait)
    assert fd is not None
    try:
        yield
    finally:
        _unlock(fd, lock_file.url, delete=True)


@contextmanager
def exclusive_if_free(lock_file: Location) -> Iterator[bool]:
    """Take ``lock_file`` exclusively without waiting: yields False at once if anyone holds it.

    `unipt cache gc` removes a cache only inside this, so it never pulls a store out from under a
    reader holding a :class:`ReadLease` or an extraction holding its build lock. Object stores: True.
    The lock file is deleted when let go: nobody else held it, so nobody needs it (a mere look would
    otherwise leave a file behind for every cache it looked at).
    """
    if not lock_file.is_local:
        yield True
        return
    fd = _lock(lock_file.url, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        _unlock(fd, lock_file.url, delete=True)


class ReadLease:
    """A shared lock held for as long as a cache is being read (e.g. by a training run).

    Readers share it; `unipt cache gc` needs it exclusively to remove the cache, so it skips a cache
    in use. Taking it waits only while a gc is removing that very cache (then the reader finds no cache
    and says so). The kernel drops it when the reader exits or dies. Best effort: where the lock file
    cannot be created (a read-only place, an object store) reading works without one.

    Release it with :meth:`release` or by using it as a context manager; the last reader to let go
    deletes the lock file.
    """

    def __init__(self, lock_file: Location | None) -> None:
        self._fd: int | None = None
        self._path = ""
        if lock_file is None or not lock_file.is_local:
            return
        try:
            self._fd = _lock(lock_file.url, fcntl.LOCK_SH)
        except OSError:
            return
        self._path = lock_file.url

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Converting to exclusive succeeds only if no other reader (and no gc) holds it: then we
            # are the last one and the file can go. flock may drop our shared lock while converting,
            # which is fine: we are letting go anyway.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            last = True
        except OSError:
            last = False
        _unlock(fd, self._path, delete=last)

    def __enter__(self) -> ReadLease:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


class LeaseSet(ReadLease):
    """Several read leases held and let go together: a view's and those of the segments it reads."""

    def __init__(self, leases: list[ReadLease]) -> None:
        super().__init__(None)
        self.leases = list(leases)

    @property
    def held(self) -> bool:
        return any(lease.held for lease in self.leases)

    def release(self) -> None:
        leases, self.leases = getattr(self, "leases", []), []
        for lease in leases:
            lease.release()
