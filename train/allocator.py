"""glibc malloc settings for a training process: one arena, and freed memory handed back between batches.

The loader's threads allocate every batch and the training thread frees it. glibc gives each thread
that contends for malloc an arena of its own (up to 8 per core) and returns freed memory to the arena
that made it, where other threads' allocations do not find it: measured on a BERT-large-shaped cache,
a training epoch's peak RSS was 1.75 GB with the default arenas and 1.45-1.53 GB with one (about the
working set; the epoch was no slower). The cap only holds for arenas made after it, so ``train`` applies
it when imported and the CLI imports ``train`` first. ``MALLOC_ARENA_MAX`` set by the user wins.

Even in one arena, a step's buffers change size with every batch (each pads to its own longest example),
so freed ones leave holes that the next, larger batch cannot use and the heap grows past the working set.
:func:`return_freed_memory` gives those holes' pages back to the system (``malloc_trim``); the loader calls
it after each large batch it pads (``train.return_freed_memory``, ``TRIM_AFTER_BATCH_VALUES``).
On the BERT-large-shaped cache of ``benchmarks/scaling.py`` that took an epoch's peak RSS from 1,940 to
1,670 MiB, for 2-3 s more per 10-12 s epoch: the returned pages are zeroed again when they are used again.
Results do not change.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
_done = False


def _glibc(name: str) -> Callable[..., int] | None:
    """A glibc malloc function, or None off Linux or outside glibc (musl has neither)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def use_one_malloc_arena() -> bool:
    """Cap glibc's malloc arenas at one for this process (once; Linux/glibc only). True if applied."""
    global _done
    if _done or "MALLOC_ARENA_MAX" in os.environ:
        return False
    _done = True
    mallopt = _glibc("mallopt")
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, 1))


_malloc_trim = _glibc("malloc_trim")


def return_freed_memory() -> bool:
    """Give the pages of memory freed inside this process back to the system (glibc's ``malloc_trim``).
    True if some were released; False when nothing was, or off glibc."""
    return _malloc_trim is not None and bool(_malloc_trim(0))
