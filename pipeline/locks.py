"""One extraction per cache key at a time, across processes on a machine or a shared filesystem.

A second ``unipt extract`` of a key that is being built waits for the first, then finds the
committed cache and returns it, instead of writing the same shards into the same partial store.
Object stores have no locks; there two concurrent builds of a key write identical bytes and the
commit is idempotent (the last writer publishes the same store), which is safe but wasteful.
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
