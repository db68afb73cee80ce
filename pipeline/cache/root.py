"""A cache root: where its views, spaces, segments, partial builds, leases and trash live, and how a
store's root attributes are read. The layout is specified in ``docs/cache-format.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unipt.pipeline.cache.layout import METADATA_FILE
from unipt.pipeline.errors import UniptError
from unipt.pipeline.storage import Location

PARTIAL_DIR = ".partial"
LEASES_DIR = ".leases"
TRASH_DIR = ".trash"  # what gc and compact move aside before deleting it
SPACES_DIR = "spaces"
SEGMENTS_DIR = "segments"
SPACE_FILE = "space.json"


def check_key(key: str) -> None:
    # Keys become directory names: refuse anything that could climb out of the cache root.
    if not is_key(key):
        raise UniptError(f"cache key {key!r} is not a hex digest; cache keys come from `unipt run/extract`")


class CacheRoot:
    """A directory (or bucket prefix) of caches, addressed by key."""

    def __init__(self, root: str | Path | Location, options: dict[str, Any] | None = None) -> None:
        self.root = root if isinstance(root, Location) else Location(root, options)

    def __str__(self) -> str:
        return str(self.root)

    def location(self, key: str) -> Location:
        check_key(key)
        return self.root.child(key)

    def partial_location(self, key: str) -> Location:
        """Where the store for ``key`` is built: beside the root locally, in place on object stores."""
        check_key(key)
        return self.root.child(PARTIAL_DIR, key) if self.root.is_local else self.root.child(key)

    def lock_location(self, key: str) -> Location:
        """The lock file that serializes builds of ``key`` (see :mod:`unipt.pipeline.cache.locks`)."""
        check_key(key)
        return self.root.child(PARTIAL_DIR, f"{key}.lock")

    def lease_location(self, key: str) -> Location:
        """The lock file readers of ``key`` hold shared and gc takes exclusively
        (:mod:`unipt.pipeline.cache.locks`)."""
        check_key(key)
        return self.root.child(LEASES_DIR, f"{key}.lock")

    def space_location(self, space: str) -> Location:
        """An activation space: ``space.json`` and its segments (see ``docs/cache-format.md``)."""
        check_key(space)
        return self.root.child(SPACES_DIR, space)

    def segment_location(self, space: str, segment: str) -> Location:
        check_key(segment)
        return self.space_location(space).child(SEGMENTS_DIR, segment)

    def spaces(self) -> list[str]:
        return sorted(name for name in self.root.child(SPACES_DIR).listdir() if is_key(name))

    def segments(self, space: str) -> list[str]:
        """Committed segments of ``space``, oldest first (by commit time, then id)."""
        folder = self.space_location(space).child(SEGMENTS_DIR)
        found = []
        for name in folder.listdir():
            attrs = read_attrs(folder.child(name)) if is_key(name) else None
            if attrs and attrs.get("complete"):
                found.append((str(attrs.get("committed_at", "")), name))
        return [name for _, name in sorted(found)]

    def has(self, key: str) -> bool:
        return is_complete(self.location(key))

    def keys(self) -> list[str]:
        return [name for name in self.root.listdir() if is_key(name) and is_complete(self.root.child(name))]

    def partial_keys(self) -> list[str]:
        """Keys of stores that exist but are not committed (interrupted or running extractions)."""
        if self.root.is_local:
            return [name for name in self.root.child(PARTIAL_DIR).listdir() if is_key(name)]
        return [name for name in self.root.listdir() if is_key(name) and not self.has(name)]


def is_key(name: str) -> bool:
    return 0 < len(name) <= 64 and all(c in "0123456789abcdef" for c in name)


def read_attrs(location: Location) -> dict[str, Any] | None:
    """The group attributes of the store at ``location``, or None if there is no readable store."""
    root = read_root(location)
    return root[1] if root else None


def read_root(location: Location) -> tuple[bytes, dict[str, Any]] | None:
    """The root ``zarr.json`` as bytes (for its checksum) and its attributes, or None."""
    try:
        raw = location.child(METADATA_FILE).read_bytes()
        meta = json.loads(raw)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("attributes", {}), dict):
        return None
    return raw, meta.get("attributes", {})


def is_complete(location: Location) -> bool:
    attrs = read_attrs(location)
    return bool(attrs and attrs.get("complete"))
