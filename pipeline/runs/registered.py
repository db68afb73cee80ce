"""Is a cache the one the registered runs read? A check before training and in ``unipt cache verify``.

A cache's manifest (``checksums.json``) is unkeyed: it catches accidents, not a deliberate edit whose
author reseals the manifest. So the **root digest** (:func:`unipt.pipeline.cache.checksums.root_digest`) of
every cache a run read is kept in its run record and the registry; a cache read again (``unipt train``,
``unipt run`` on a cache hit, ``unipt rerun``, ``unipt cache verify --against-registry``) must have a root
digest some registered run read (``docs/integrity.md``).
"""

from __future__ import annotations

from pathlib import Path

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.errors import UniptError
from unipt.pipeline.runs.registry import Registry


def registry_mismatch(registry: str | Path, key: str, digest: str | None) -> str | None:
    """Why a cache ``key`` with root digest ``digest`` is not what registered runs read, or None (also
    when nothing is recorded: no registry, no run of that key, or runs from before root digests)."""
    path = Path(registry).expanduser()
    if digest is None or not path.exists():
        return None
    with Registry(path, create=False) as runs:
        recorded = runs.cache_digests(key)
    if not recorded or digest in recorded:
        return None
    theirs, run_ids = next(iter(recorded.items()))
    return (
        f"its root digest is {digest[:16]}, but run {run_ids[0]} in {path} read it as {theirs[:16]} "
        f"({sum(map(len, recorded.values()))} registered run(s) read it): it changed after those runs"
    )


def check_registered(registry: str | Path, key: str, reader: ActivationCache) -> None:
    """Refuse ``reader`` (cache ``key``) when registered runs read other content under that key."""
    problem = registry_mismatch(registry, key, reader.root_digest())
    if problem:
        raise UniptError(
            f"cache {reader.source} is not the cache registered runs trained on: {problem}; see `unipt cache "
            f"verify {key} --against-registry`, then delete it and run `unipt extract` (or `unipt run`)"
        )
