"""``unipt cache gc`` and ``unipt cache compact``: remove the caches no run needs, merge a space's segments.

The cache modules (zarr) are imported by the commands, not when the parser is built.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from unipt.pipeline.errors import UniptError
from unipt.pipeline.log import human_bytes
from unipt.pipeline.runs.records import referenced_cache_keys
from unipt.pipeline.runs.registry import Registry, registered_cache_keys

if TYPE_CHECKING:
    from unipt.pipeline.cache.root import CacheRoot


def _check_references_exist(args: argparse.Namespace) -> None:
    """gc keeps what the runs root and the registry reference: if either is missing (run from another
    folder, where the relative defaults point at nothing, or a typo), every cache would look unused."""
    if args.no_registry:
        return
    missing = [path for path in (args.runs_root, args.registry) if not Path(path).expanduser().exists()]
    if missing:
        verb = "do" if len(missing) > 1 else "does"
        raise UniptError(
            f"gc keeps the caches that the runs root {args.runs_root} and the registry {args.registry} "
            f"reference, but {' and '.join(missing)} {verb} not exist; pass the right --runs-root and "
            "--registry (or run from the project folder, or set UNIPT_HOME), or --no-registry if no run "
            "needs these caches"
        )


def _view_root_digests(root: CacheRoot, space: str) -> dict[str, str]:
    """Each view of ``space`` that passes a strict open (segments included) -> its root digest: what the
    registry may move to the rewritten view after compaction. A view that fails is left out, so its runs
    keep the digest they read and a damaged view is not laundered into a fresh one."""
    from unipt.pipeline.cache.opener import open_cache
    from unipt.pipeline.cache.space import views_of

    digests = {}
    for key in views_of(root, space):
        try:
            reader = open_cache(root.location(key))
        except UniptError:
            continue
        with reader:
            digest = reader.root_digest()
        if digest is not None:
            digests[key] = digest
    return digests


def cmd_gc(args: argparse.Namespace) -> int:
    from unipt.pipeline.cache.admin import (
        empty_trash,
        find_garbage,
        linked_lock_files,
        remove,
        remove_empty_spaces,
        sweep_lock_files,
        trash_leftovers,
    )
    from unipt.pipeline.cache.root import TRASH_DIR, CacheRoot

    root = CacheRoot(args.cache_root)
    _check_references_exist(args)
    # A cache is in use if a run record or the registry points at it (records may have been pruned).
    referenced = referenced_cache_keys(args.runs_root) | registered_cache_keys(args.registry)
    found = find_garbage(root, referenced, include_partial=args.include_partial)
    garbage = []
    for item in found:
        kind = (" (unfinished)" if not item.committed else
                f" (segment of space {item.space})" if item.space else
                " (space)" if item.kind == "space" else
                " (view)" if item.kind == "view" else "")  # fmt: skip
        if item.link is not None:
            print(
                f"skipping {item.key}{kind}: {item.link} is a symbolic link; gc never follows or deletes "
                "through links in the cache root (remove the link yourself if it is not wanted)"
            )
            continue
        # In use: read by a running process (a training run) or, unfinished, still being extracted.
        if item.in_use or (args.yes and not remove(root, item)):
            user = "a running process is reading it" if item.committed else "an extraction is building it"
            print(f"skipping {item.key}{kind}: {user}; run gc again when it has finished")
            continue
        print(f"{'removing' if args.yes else 'would remove'} {item.key}{kind}  {human_bytes(item.bytes)}")
        garbage.append(item)
    for link in linked_lock_files(root):
        print(f"skipping a lock file: {link} is a symbolic link; gc never follows or deletes it")
    trash = trash_leftovers(root)
    if args.yes:
        for space in remove_empty_spaces(root):
            print(f"removing space {space}: no segment or view left in it")
        sweep_lock_files(root)  # empty lock files left by killed processes
        trash = empty_trash(root)  # what a gc or compact killed midway left
    if trash:
        print(
            f"{'removing' if args.yes else 'would remove'} {len(trash)} leftover(s) of an interrupted gc "
            f"or compact in {root.root.child(TRASH_DIR)}  {human_bytes(sum(trash.values()))}"
        )
    total = sum(item.bytes for item in garbage) + sum(trash.values())
    leftovers = f" and {len(trash)} trash leftover(s)" if trash else ""
    summary = f"{len(garbage)} cache(s){leftovers}, {human_bytes(total)}"
    if not args.yes and (garbage or trash):
        print(
            f"dry run: {summary} unreferenced by any run in {args.runs_root} or {args.registry}; "
            "add --yes to remove them"
        )
    else:
        print(f"{'removed' if args.yes else 'nothing to remove:'} {summary}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from unipt.pipeline.cache.admin import refuse_damaged_space, remove_segments
    from unipt.pipeline.cache.locks import exclusive
    from unipt.pipeline.cache.root import CacheRoot, is_key
    from unipt.pipeline.cache.space import compact

    root = CacheRoot(args.cache_root)
    space = args.space
    if not is_key(space) or space not in root.spaces():
        raise UniptError(f"no activation space {space} under {root}; `unipt cache ls` lists them")
    replaced = root.segments(space)
    before = sum(root.segment_location(space, s).size() for s in replaced)
    # The space's build lock: no extraction adds a segment (or writes a view) while we merge.
    with exclusive(
        root.lock_location(space), on_wait=lambda: print("waiting for an extraction", file=sys.stderr)
    ):
        refuse_damaged_space(root, space, root.segments(space))  # compaction must not reseal damage
        before_digests = _view_root_digests(root, space)
        merged = compact(root, space)
        if merged is not None:
            _move_registered_digests(root, before_digests, args.registry)
        if merged is not None:
            for segment in remove_segments(root, space, replaced):
                print(f"segment {segment} is being read; `unipt cache gc --yes` removes it once it is free")
    if merged is not None:
        after = sum(root.segment_location(space, s).size() for s in root.segments(space))
        print(f"compacted space {space} into {merged} ({human_bytes(before)} -> {human_bytes(after)})")
    return 0


def _move_registered_digests(root: CacheRoot, before: dict[str, str], registry: str) -> None:
    """After compaction: the runs that read a view as it was now name the rewritten view's root digest
    (same examples, same activations, another layout), so reruns and `train` keep accepting it."""
    if not Path(registry).expanduser().is_file():
        return
    from unipt.pipeline.cache.checksums import stored_root_digest

    with Registry(registry, create=False) as runs:
        for key, old in before.items():
            new = stored_root_digest(root.location(key))
            if new is not None and new != old and runs.replace_cache_digest(key, old, new):
                print(f"registry {registry}: runs of view {key} now name its compacted root digest")
