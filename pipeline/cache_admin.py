"""Looking after caches: describe one, verify its bytes, and remove the ones no run needs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.cache import LEASES_DIR, PARTIAL_DIR, CacheReader, CacheRoot, is_key
from pipeline.checksums import Problem, verify_files
from pipeline.locks import exclusive_if_free
from pipeline.storage import Location

TRASH_DIR = ".trash"
LOCK_SUFFIX = ".lock"  # see CacheRoot.lock_location / lease_location


def describe(reader: CacheReader) -> dict[str, Any]:
    """What ``unipt cache info`` prints: identity, shape, layout and size of one cache."""
    attrs = reader.attrs
    layout = reader.layout
    backbone = attrs.get("backbone", {})
    return {
        "key": attrs.get("cache_key"),
        "location": reader.source,
        "format_version": attrs.get("format_version"),
        "committed_at": attrs.get("committed_at"),
        "dataset_fingerprint": attrs.get("dataset_fingerprint"),
        "backbone": {
            key: backbone.get(key)
            for key in (
                "name",
                "model_type",
                "revision",
                "weights_sha256",
                "config_sha256",
                "tokenizer_sha256",
            )
        },
        "tokenizer": attrs.get("tokenizer"),
        "layers": reader.layers,
        "hidden_sizes": {str(k): v for k, v in reader.hidden_sizes.items()},
        "grids": attrs.get("grids", {}),
        "dtype": reader.dtype,
        "max_length": layout.max_length,
        "examples": reader.num_examples,
        "splits": {s: int(len(reader.split_indices(s))) for s in ("train", "val", "test")},
        "total_tokens": attrs.get("total_tokens"),
        "label_names": reader.label_names,
        "codec": {
            "codec": layout.codec,
            "shuffle": layout.shuffle,
            "level": layout.compression_level,
            "chunk_rows": layout.chunk_rows,
            "chunks_per_file": layout.chunks_per_file,
        },
        "shards": len(layout.shards()),
        "bytes_on_disk": reader.nbytes_on_disk(),
    }


def verify(reader: CacheReader, progress: Callable[[int], None] | None = None) -> list[Problem]:
    """Everything wrong with a cache: each file in the manifest re-hashed against the sha256 recorded when
    it was written (format 3: every chunk, every zarr.json and examples.parquet; format 2: data files),
    the manifest itself (missing, or its seal broken), and metadata that contradicts the attributes."""
    expected = reader.checksums(missing_ok=True)
    arrays = reader.layout.arrays()

    def rows_of(array: str) -> int | None:
        return arrays[array].rows_per_file if array in arrays else None

    problems = verify_files(reader.location, expected, rows_of, progress=progress)
    return problems + reader.metadata_problems()


@dataclass(frozen=True)
class Garbage:
    key: str
    bytes: int
    committed: bool
    in_use: bool = False  # a reader holds its lease, or (unfinished) an extraction is building it


def _guard(root: CacheRoot, key: str, committed: bool) -> Location:
    """The lock that says a store is in use: readers' lease (committed) or the build lock (partial)."""
    return root.lease_location(key) if committed else root.lock_location(key)


def _in_use(root: CacheRoot, key: str, committed: bool) -> bool:
    with exclusive_if_free(_guard(root, key, committed)) as free:
        return not free


def find_garbage(root: CacheRoot, referenced: Iterable[str], include_partial: bool = False) -> list[Garbage]:
    """Committed caches no run record references (and, optionally, unfinished ones)."""
    keep = set(referenced)
    found = [
        Garbage(key, root.location(key).size(), True, _in_use(root, key, True))
        for key in root.keys()
        if key not in keep
    ]
    if include_partial:
        found += [
            Garbage(key, root.partial_location(key).size(), False, _in_use(root, key, False))
            for key in root.partial_keys()
        ]
    return found


def remove(root: CacheRoot, item: Garbage) -> bool:
    """Remove a store unless it is in use (then False): checked and renamed away under one lock, so a
    reader either got its lease first (and the store stays) or waits and then finds no store. The lock
    file goes with it."""
    location = root.location(item.key) if item.committed else root.partial_location(item.key)
    with exclusive_if_free(_guard(root, item.key, item.committed)) as free:
        if not free:
            return False
        if location.is_local and location.exists():
            # Rename first, so the key disappears in one step and no reader meets a half-deleted store.
            trash = root.root.child(TRASH_DIR, f"{item.key}-{uuid.uuid4().hex[:8]}")
            os.makedirs(os.path.dirname(trash.url), exist_ok=True)
            os.replace(location.url, trash.url)
            location = trash
    location.remove()
    return True


def sweep_lock_files(root: CacheRoot) -> int:
    """Delete lock files nobody holds (left by processes that were killed); returns how many.

    Builds and readers delete their own lock files when they let go (see :mod:`pipeline.locks`); a
    killed process cannot, and leaves an empty file in ``.partial/`` or ``.leases/``. Each is taken
    without waiting and deleted while held, so a lock someone holds, or takes meanwhile, is untouched.
    """
    if not root.root.is_local:
        return 0
    removed = 0
    for folder in (PARTIAL_DIR, LEASES_DIR):
        for name in root.root.child(folder).listdir():
            if name.endswith(LOCK_SUFFIX) and is_key(name.removesuffix(LOCK_SUFFIX)):
                with exclusive_if_free(root.root.child(folder, name)) as free:
                    removed += free
    return removed
