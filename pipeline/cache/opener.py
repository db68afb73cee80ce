"""Open a cache by path or URL, whatever it is: a view over an activation space, a Zarr store (a segment,
or a cache of format 2/3), or an HDF5 export (``.h5``/``.hdf5``).

Its own module because it needs every reader: :mod:`unipt.pipeline.cache.view` and
:mod:`unipt.pipeline.cache.hdf5` build on :mod:`unipt.pipeline.cache.reader`, so the dispatch cannot live
in ``cache.py`` without an import loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.cache.attrs import parse_attrs
from unipt.pipeline.cache.hdf5 import HDF5CacheReader
from unipt.pipeline.cache.layout import VIEW_KIND
from unipt.pipeline.cache.reader import CacheReader
from unipt.pipeline.cache.root import read_attrs
from unipt.pipeline.cache.view import STORED_ORDER, ViewReader
from unipt.pipeline.storage import Location


def open_cache(
    target: str | Path | Location,
    expect: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    strict: bool = True,
    view_order: int = STORED_ORDER,
) -> ActivationCache:
    """The reader for what is stored at ``target``, chosen by its stored attributes (``kind: view``: a
    :class:`ViewReader`) or its file name (an HDF5 export). Close it (or use it as a context manager)
    to let go of its read leases. ``strict=False`` (Zarr only) skips the read checks, for verify.
    ``view_order`` is the order a view presents its examples in (``train.view_order``; other stores
    are in their physical order already)."""
    if str(target).endswith((".h5", ".hdf5")):
        return HDF5CacheReader(target, expect=expect)
    location = target if isinstance(target, Location) else Location(target, options)
    attrs = read_attrs(location)
    if attrs is not None and parse_attrs(attrs, str(location)).kind == VIEW_KIND:
        return ViewReader(location, expect=expect, options=options, strict=strict, view_order=view_order)
    return CacheReader(location, expect=expect, options=options, strict=strict)
