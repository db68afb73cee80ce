"""``unipt cache ...``: list, describe, verify, export and garbage-collect activation caches (gc and compact:
:mod:`unipt.pipeline.cli.cache_cleanup`).

The cache modules (zarr) are imported by the commands that open a cache, not by building the parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from unipt.pipeline.cli.cache_cleanup import cmd_compact, cmd_gc
from unipt.pipeline.cli.common import print_json
from unipt.pipeline.errors import UniptError
from unipt.pipeline.log import human_bytes
from unipt.pipeline.runs.registry import Registry
from unipt.pipeline.storage import DEFAULT_CACHE_ROOT, DEFAULT_REGISTRY, DEFAULT_RUNS_ROOT

if TYPE_CHECKING:
    from unipt.pipeline.cache.reader import CacheReader
    from unipt.pipeline.cache.root import CacheRoot
    from unipt.pipeline.cache.view import ViewReader


def _open(target: str, cache_root: str, strict: bool = True) -> CacheReader | ViewReader:
    """A cache named by its key (under --cache-root) or by its path/URL; close it when done.
    ``strict=False`` (verify) opens a store without the read checks, so that its damage can be listed
    rather than stop the open."""
    from unipt.pipeline.cache.opener import open_cache
    from unipt.pipeline.cache.reader import CacheReader
    from unipt.pipeline.cache.root import CacheRoot, is_key
    from unipt.pipeline.cache.view import ViewReader

    location = CacheRoot(cache_root).location(target) if is_key(target) else target
    reader = open_cache(location, strict=strict)
    if not isinstance(reader, (CacheReader, ViewReader)):
        reader.close()
        raise UniptError(f"{target} is an exported HDF5 copy; this command works on Zarr caches")
    return reader


def _print_ls(caches: list[dict], spaces: list[dict]) -> None:
    """The `cache ls` tables: caches and views first (a view's size counts the segments it reads), then
    each activation space's segments."""
    if caches:
        width = max(len(c["key"]) for c in caches)
        print(
            f"{'key':<{width}}  {'backbone':<28} {'dtype':<8} {'examples':>8} {'tokens':>9}  "
            f"{'reads':>9}  {'own':>9}  {'committed_at':<20}  what"
        )
    for c in caches:
        if c["kind"] == "unreadable":
            print(f"{c['key']:<{width}}  unreadable: {c['error']}")
            continue
        what = (
            f"view of space {c['space']} ({c['segments']} segment(s))"
            if c["kind"] == "view"
            else f"format {c['format_version']} cache (one segment, one view)"
        )
        print(
            f"{c['key']:<{width}}  {c['backbone'] or '?':<28} {c['dtype']:<8} {c['examples']:>8} "
            f"{c['tokens']:>9}  {human_bytes(c['bytes']):>9}  {human_bytes(c['own_bytes']):>9}  "
            f"{c['committed_at']:<20}  {what}"
        )
    if caches:
        print("(reads: the bytes a run reads, a view's own files plus its segments'; own: its files alone)")
    for space in spaces:
        print(f"space {space['space']}  {len(space['segments'])} segment(s)  {human_bytes(space['bytes'])}")
        labels = [f"segment {segment['id']}" for segment in space["segments"]]
        if labels:
            width = max(map(len, labels))
            print(f"  {'segment':<{width}}  {'inputs':>7}  {'tokens':>9}  {'size':>9}  committed_at")
        for label, segment in zip(labels, space["segments"], strict=True):
            print(
                f"  {label:<{width}}  {segment['inputs']:>7}  {segment['tokens']:>9}  "
                f"{human_bytes(segment['bytes']):>9}  {segment['committed_at']}"
            )


def _listed_cache(key: str, reader: CacheReader | ViewReader) -> dict:
    """One cache as `cache ls` shows it. A view's ``bytes`` is what reading it reads: its own files plus
    the segments it reads from (which other views may share); ``own_bytes`` is its files alone."""
    segments = getattr(reader, "segments", None)
    return {
        "key": key,
        "kind": "view" if segments is not None else "cache",
        "backbone": reader.meta.backbone.get("name"),
        "dtype": reader.dtype,
        "examples": reader.num_examples,
        "tokens": reader.meta.total_tokens or 0,
        "bytes": reader.nbytes_on_disk(),
        "own_bytes": reader.own_bytes() if segments is not None else reader.nbytes_on_disk(),
        "committed_at": reader.meta.committed_at or "",
        "space": reader.meta.space_key if segments is not None else None,
        "segments": len(segments) if segments is not None else 1,
        "format_version": reader.format_version,
    }


def _listed_space(root: CacheRoot, space: str) -> dict:
    from unipt.pipeline.cache.reader import CacheReader

    segments = []
    for segment in root.segments(space):
        location = root.segment_location(space, segment)
        with CacheReader(location) as reader:
            segments.append(
                {
                    "id": segment,
                    "inputs": reader.num_examples,
                    "tokens": reader.meta.total_tokens or 0,
                    "bytes": location.size(),
                    "committed_at": reader.meta.committed_at or "",
                }
            )
    return {"space": space, "bytes": sum(s["bytes"] for s in segments), "segments": segments}


def cmd_ls(args: argparse.Namespace) -> int:
    from unipt.pipeline.cache.admin import trash_leftovers
    from unipt.pipeline.cache.opener import open_cache
    from unipt.pipeline.cache.root import TRASH_DIR, CacheRoot

    root = CacheRoot(args.cache_root)
    keys = root.keys()
    if not keys:
        print(f"no committed caches under {root}", file=sys.stderr)
    caches: list[dict] = []
    for key in keys:
        try:
            reader = open_cache(root.location(key))
        except UniptError as exc:  # a view whose segment is gone: say so, list the rest
            caches.append({"key": key, "kind": "unreadable", "error": str(exc)})
            continue
        with reader:
            caches.append(_listed_cache(key, reader))
    spaces = [_listed_space(root, space) for space in root.spaces()]
    if args.json:
        print_json({"cache_root": str(root), "caches": caches, "spaces": spaces})
    else:
        _print_ls(caches, spaces)
    partial = root.partial_keys()
    if partial:
        print(
            f"({len(partial)} unfinished: {', '.join(partial)}; `unipt extract` resumes them)",
            file=sys.stderr,
        )
    trash = trash_leftovers(root)
    if trash:
        print(
            f"({len(trash)} leftover(s) in {root.root.child(TRASH_DIR)}, {human_bytes(sum(trash.values()))}, "
            "from an interrupted gc or compact; `unipt cache gc --yes` removes them)",
            file=sys.stderr,
        )
    return 0


def _verify_hdf5(path: str) -> int:
    from unipt.pipeline.cache.hdf5 import verify_hdf5

    checked, problems = verify_hdf5(path)
    for problem in problems:
        print(f"DAMAGED {problem}")
    if problems:
        print(f"unipt: {path} cannot be trusted; export it again from the Zarr cache", file=sys.stderr)
        return 1
    print(f"ok: {checked} datasets match their checksums ({path})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from unipt.pipeline.cache.admin import describe

    with _open(args.cache, args.cache_root) as reader:
        print_json(describe(reader))  # JSON either way; --json is accepted for symmetry
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if str(args.cache).endswith((".h5", ".hdf5")):
        return _verify_hdf5(args.cache)
    from tqdm.auto import tqdm

    from unipt.pipeline.cache.admin import damaged_stores, expected_files, verify

    with _open(args.cache, args.cache_root, strict=False) as reader:
        expected = expected_files(reader)
        with tqdm(total=expected, unit="file", desc="verify", disable=args.no_progress) as bar:
            problems = verify(reader, progress=bar.update)
        stores = damaged_stores(reader, problems)
        for problem in problems:
            print(f"DAMAGED {problem}")
        if args.against_registry and not problems and _registry_says_changed(reader, args.registry):
            return 1
    if problems:
        print(
            f"unipt: {len({p.file for p in problems})} of {expected} files damaged in {reader.source}; "
            f"delete the damaged store{'s' if len(stores) > 1 else ''} ({' '.join(stores)}) and run "
            "`unipt extract` (or `unipt run`) again: it re-extracts what they held and reuses the rest",
            file=sys.stderr,
        )
        return 1
    print(f"ok: {expected} files match their checksums ({reader.source})")
    return 0


def _registry_says_changed(reader: CacheReader, registry: str) -> bool:
    """``verify --against-registry``: whether ``reader``'s root digest is none that registered runs read
    (said in one line); a registry that is not there is refused, since nothing could be compared."""
    from unipt.pipeline.cache.provenance import key_of
    from unipt.pipeline.runs.registered import registry_mismatch

    if not Path(registry).expanduser().is_file():
        raise UniptError(f"no run registry at {registry}; pass --registry with the one your runs used")
    key = key_of(reader)
    with Registry(registry, create=False) as runs:
        recorded = runs.cache_digests(key)
    if not recorded:
        print(f"note: no run in {registry} recorded a root digest for cache {key}: nothing to compare")
        return False
    problem = registry_mismatch(registry, key, reader.root_digest())
    if problem is None:
        print(f"ok: cache {key} is the cache {len(recorded)} registered digest(s) name ({registry})")
        return False
    print(f"DAMAGED root digest: {problem}")
    print(
        f"unipt: cache {reader.source} was changed after the runs in {registry} read it (its files match its "
        "own checksums, which were rewritten); delete it and run `unipt extract` (or `unipt run`) again",
        file=sys.stderr,
    )
    return True


def cmd_export(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from unipt.pipeline.cache.hdf5 import export_hdf5

    with _open(args.cache, args.cache_root) as reader:
        total = sum(
            int((reader.offsets_for(layer)[:, 1] - reader.offsets_for(layer)[:, 0]).sum())
            for layer in reader.layers
        )
        with tqdm(total=total, unit="row", desc="export", disable=args.no_progress) as bar:
            out = export_hdf5(reader, args.out, compression=args.compression, progress=bar.update)
    print(out)
    return 0


def add_cache_commands(sub: argparse._SubParsersAction) -> None:
    cache = sub.add_parser(
        "cache",
        help="list, inspect, verify, export and clean up activation caches",
        description="list, inspect, verify, export and clean up activation caches",
    )
    actions = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")

    def action(name: str, help_text: str, handler, target: bool = False) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_text, description=help_text)
        if target:
            p.add_argument("cache", help="a cache key (looked up under --cache-root) or a cache path/URL")
        p.add_argument(
            "--cache-root",
            default=DEFAULT_CACHE_ROOT,
            help=f"directory or URL of caches (default: {DEFAULT_CACHE_ROOT})",
        )
        p.set_defaults(handler=handler)
        return p

    ls = action("ls", "list views (and older caches), then each activation space's segments", cmd_ls)
    ls.add_argument("--json", action="store_true", help="print the caches and spaces as JSON on stdout")
    compact_p = action(
        "compact",
        "merge an activation space's segments into one (atomic; its views are rewritten to read it)",
        cmd_compact,
    )
    compact_p.add_argument("space", help="the activation space's key (see `unipt cache ls`)")
    info = action(
        "info", "print one cache's identity, layers, layout and size as JSON", cmd_info, target=True
    )
    info.add_argument("--json", action="store_true", help="strict JSON (the default)")
    verify_p = action(
        "verify",
        "re-hash every data file against the checksums recorded at write time; exit 1 if any differ",
        cmd_verify,
        target=True,
    )
    verify_p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    verify_p.add_argument(
        "--against-registry",
        action="store_true",
        help="also check that the cache is the one registered runs read (its root digest; see --registry)",
    )
    for p in (verify_p, compact_p):
        p.add_argument(
            "--registry",
            default=DEFAULT_REGISTRY,
            help=f"run registry with the root digests runs recorded (default: {DEFAULT_REGISTRY})",
        )
    gc = action(
        "gc",
        "remove caches that no run record or registered run references (a dry run unless --yes)",
        cmd_gc,
    )
    gc.add_argument(
        "--runs-root", default=DEFAULT_RUNS_ROOT, help=f"run records (default: {DEFAULT_RUNS_ROOT})"
    )
    gc.add_argument(
        "--registry", default=DEFAULT_REGISTRY, help=f"run registry (default: {DEFAULT_REGISTRY})"
    )
    gc.add_argument(
        "--no-registry",
        action="store_true",
        help="go on although the runs root or the registry does not exist (on purpose: no run needs "
        "these caches); whichever of them exists is still honoured",
    )
    gc.add_argument("--yes", action="store_true", help="really remove them (default: only list them)")
    gc.add_argument(
        "--include-partial",
        action="store_true",
        help="also remove unfinished stores (only when no extraction is running: they are what resumes)",
    )
    export = action(
        "export", "copy a cache to another format (HDF5) for other tools", cmd_export, target=True
    )
    export.add_argument("--format", choices=["hdf5"], default="hdf5", help="output format (default: hdf5)")
    export.add_argument("--out", required=True, help="output file, e.g. cache.h5")
    export.add_argument(
        "--compression", choices=["none", "lzf", "gzip"], default="lzf", help="HDF5 filter (default: lzf)"
    )
    export.add_argument("--no-progress", action="store_true", help="hide the progress bar")
