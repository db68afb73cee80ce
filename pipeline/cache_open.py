"""Open a cache by path or URL, whatever its storage: a Zarr store, or an HDF5 export (``.h5``/``.hdf5``).

Its own module because it needs both readers: :mod:`pipeline.hdf5` builds on :mod:`pipeline.cache`,
so the dispatch cannot live in ``cache.py`` without an import loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.cache import ActivationCache, CacheReader
from pipeline.hdf5 import HDF5CacheReader
from pipeline.storage import Location


def open_cache(
    target: str | Path | Location,
    expect: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> ActivationCache:
    """A reader for a Zarr cache directory/URL or an exported HDF5 file (``.h5``/``.hdf5``)."""
    if str(target).endswith((".h5", ".hdf5")):
        return HDF5CacheReader(target, expect=expect)
    return CacheReader(target, expect=expect, options=options)
