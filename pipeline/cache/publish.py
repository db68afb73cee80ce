"""Making a finished store visible, and taking one away, each in one step.

Locally a store is built under another name and renamed into place (``os.replace``: the store appears whole
or not at all), and a store is removed by renaming it into the root's ``.trash/`` first, so that no reader
ever meets a half-deleted one. Object stores have no rename: there a store is built in place and the
``complete: true`` written last in its ``zarr.json`` is the commit (``docs/cache-format.md``), so both
steps leave it as it is.
"""

from __future__ import annotations

import os
import uuid

from unipt.pipeline.cache.root import TRASH_DIR, CacheRoot, is_complete
from unipt.pipeline.storage import Location


def publish(staged: Location, final: Location) -> Location:
    """Rename the finished store ``staged`` to ``final`` in one step and return ``final``. A ``final`` that
    is already there and complete was published first by another process building the same key (same
    content, by construction): ``staged`` is then dropped. ``staged == final`` (an object store): nothing
    to do."""
    if final == staged:
        return final
    os.makedirs(os.path.dirname(final.url), exist_ok=True)
    try:
        os.replace(staged.url, final.url)
    except OSError:
        if not is_complete(final):
            raise
        staged.remove()
    return final


def replace(root: CacheRoot, staged: Location, final: Location, name: str) -> Location:
    """Publish ``staged`` as ``final`` where an older ``final`` may stand (a view rewritten): the old one
    is renamed into ``root``'s trash and deleted first. ``staged == final`` (an object store, rewritten in
    place): nothing to do."""
    if final == staged:
        return final
    if final.exists():
        move_to_trash(root, final, name).remove()
    os.replace(staged.url, final.url)
    return final


def move_to_trash(root: CacheRoot, location: Location, name: str) -> Location:
    """Rename the local store at ``location`` to a fresh ``.trash/<name>-<random>`` of ``root`` and return
    where it went; an object store, or a store that is not there, is returned as it is."""
    if not (location.is_local and location.exists()):
        return location
    trash = root.root.child(TRASH_DIR, f"{name}-{uuid.uuid4().hex[:8]}")
    os.makedirs(os.path.dirname(trash.url), exist_ok=True)
    os.replace(location.url, trash.url)
    return trash
