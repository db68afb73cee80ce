"""Looking after caches: describe one, verify its bytes, and remove the ones no run needs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from unipt.pipeline.cache.checksums import Problem, verify_files
from unipt.pipeline.cache.layout import SEGMENT_KIND, VIEW_KIND
from unipt.pipeline.cache.locks import exclusive_if_free
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.publish import move_to_trash
from unipt.pipeline.cache.reader import CacheReader
from unipt.pipeline.cache.root import LEASES_DIR, PARTIAL_DIR, SPACES_DIR, TRASH_DIR, CacheRoot, is_key
from unipt.pipeline.errors import UniptError
from unipt.pipeline.storage import Location

LOCK_SUFFIX = ".lock"  # see CacheRoot.lock_location / lease_location
SPACE_KIND = "space"  # a Garbage item that is an activation space (only ever reported: see find_garbage)
# The root's own folders: gc and compact lock, build, move and delete inside them.
_ROOT_FOLDERS = (PARTIAL_DIR, LEASES_DIR, TRASH_DIR, SPACES_DIR)


def describe(reader: CacheReader) -> dict[str, Any]:
    """What ``unipt cache info`` prints: identity, shape, layout and size of one cache."""
    meta = reader.meta
    layout = reader.layout
    backbone = meta.backbone
    return {
        "key": meta.cache_key,
        "location": reader.source,
        "format_version": meta.format_version,
        "committed_at": meta.committed_at,
        "dataset_fingerprint": meta.dataset_fingerprint,
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
        "tokenizer": meta.tokenizer,
        "layers": reader.layers,
        "hidden_sizes": {str(k): v for k, v in reader.hidden_sizes.items()},
        "grids": meta.grids,
        "dtype": reader.dtype,
        "max_length": layout.max_length,
        "examples": reader.num_examples,
        "splits": {s: int(len(reader.split_indices(s))) for s in ("train", "val", "test")},
        "total_tokens": meta.total_tokens,
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
        **_view_part(reader),
    }


def _view_part(reader: CacheReader) -> dict[str, Any]:
    """A view's space and segments (a cache of format 2 or 3 is its own one segment)."""
    from unipt.pipeline.cache.view import ViewReader

    if not isinstance(reader, ViewReader):
        return {"kind": reader.meta.kind or "cache"}
    return {
        "kind": VIEW_KIND,
        "space": reader.space,
        "segments": [
            {"id": entry.id, "inputs": segment.num_examples, "bytes_on_disk": segment.nbytes_on_disk()}
            for entry, segment in zip(reader.meta.segments, reader.segments, strict=True)
        ],
        "view_bytes_on_disk": reader.own_bytes(),
    }


def verify(
    reader: CacheReader, progress: Callable[[int], None] | None = None, with_segments: bool = True
) -> list[Problem]:
    """Everything wrong with a cache: each file in the manifest re-hashed against the sha256 recorded when
    it was written (format 3: every chunk, every zarr.json and examples.parquet; format 2: data files),
    the manifest itself (missing, or its seal broken), and metadata that contradicts the attributes.
    A view's segments are verified too unless ``with_segments`` is False (they are checked on their own)."""
    expected = reader.checksums(missing_ok=True)
    arrays = reader.layout.arrays()

    def rows_of(array: str) -> int | None:
        return arrays[array].rows_per_file if array in arrays else None

    problems = verify_files(reader.location, expected, rows_of, progress=progress)
    problems += reader.metadata_problems()
    for segment in getattr(reader, "segments", []) if with_segments else []:  # a view: each one it reads
        for problem in verify(segment, progress):
            name = _segment_name(segment)
            problems.append(Problem(f"{name}/{problem.file}", f"{name}: {problem.what}", problem.message))
    return problems


def refuse_damaged_space(root: CacheRoot, space: str, segments: list[str]) -> None:
    """Compaction rewrites and reseals what it copies, so anything `unipt cache verify` would find in the
    space's segments or views (a flipped label, an edited zarr.json, a damaged chunk) must stop it, not be
    sealed into the merged segment. Each store is opened strictly and verified whole; a symbolic link
    among them is refused (compaction never works outside the cache root)."""
    from unipt.pipeline.cache.space import views_of

    check_root_folders(root)
    stores = [root.segment_location(space, s) for s in segments]
    stores += [root.location(key) for key in views_of(root, space)]
    for location in stores:
        link = location.symlink_below(root.root)
        if link is not None:
            raise UniptError(
                f"cannot compact space {space}: {link} is a symbolic link, and compaction never follows "
                "links out of the cache root; put the store itself there (or remove the link)"
            )
        try:
            reader = open_cache(location)
        except UniptError as exc:
            raise UniptError(f"cannot compact space {space}: {exc}") from None
        with reader:
            problems = verify(reader, with_segments=False)  # each segment is verified once, on its own
        if problems:
            raise UniptError(
                f"cannot compact space {space}: {location} is damaged ({problems[0]}"
                f"{f', and {len(problems) - 1} more' if len(problems) > 1 else ''}); run `unipt cache verify "
                f"{location}`, delete the damaged store and run `unipt extract` again: compaction would "
                "seal the damage into the merged segment"
            )


def _segment_name(segment: CacheReader) -> str:
    """How a view's problems name the segment they come from (``verify``'s prefix of their file)."""
    return f"segment {segment.location.name}"


def damaged_stores(reader: CacheReader, problems: list[Problem]) -> list[str]:
    """The stores (the cache itself, or the segments of a view) that hold ``problems``: what to delete
    so that the next extraction writes them again (a view's other segments stay and are reused)."""
    segments = {f"{_segment_name(s)}/": str(s.location) for s in getattr(reader, "segments", [])}
    stores = []
    for problem in problems:
        store = next((path for prefix, path in segments.items() if problem.file.startswith(prefix)), None)
        store = store or str(reader.location)
        if store not in stores:
            stores.append(store)
    return stores


def expected_files(reader: CacheReader) -> int:
    """How many files ``verify`` re-hashes (a view's own and its segments')."""
    own = len(reader.checksums(missing_ok=True))
    return own + sum(expected_files(segment) for segment in getattr(reader, "segments", []))


@dataclass(frozen=True)
class Garbage:
    key: str
    bytes: int
    committed: bool
    in_use: bool = False  # a reader holds its lease, or (unfinished) an extraction is building it
    kind: str = "cache"  # "view", "cache" (format 2/3, or a self-contained store), "segment" or "space"
    space: str | None = None  # a segment's activation space
    link: str | None = None  # a symbolic link on its path or its lock's: never followed, never removed

    def location(self, root: CacheRoot) -> Location:
        if self.kind == SPACE_KIND:
            return root.space_location(self.key)
        if self.kind == SEGMENT_KIND and self.space is not None:
            return root.segment_location(self.space, self.key)
        return root.location(self.key) if self.committed else root.partial_location(self.key)


def check_root_folders(root: CacheRoot) -> None:
    """Refuse a cache root whose own folders (``.partial``, ``.leases``, ``.trash``, ``spaces``) are
    symbolic links: locks, moves and deletes inside them would happen outside the root."""
    for folder in _ROOT_FOLDERS:
        link = root.root.child(folder).symlink_below(root.root)
        if link is not None:
            raise UniptError(
                f"{link} is a symbolic link inside the cache root {root}; gc and compact never follow "
                "links out of the root: replace it with a real folder (or point --cache-root at the target)"
            )


def _link_on_the_way(root: CacheRoot, item: Garbage) -> str | None:
    """The first symbolic link on the path of ``item``'s store or of its lock file, if any."""
    guards = [] if item.kind == SPACE_KIND else [_guard(root, item.key, item.committed)]
    for location in (item.location(root), *guards):
        link = location.symlink_below(root.root)
        if link is not None:
            return link
    return None


def _found(root: CacheRoot, item: Garbage, size: Callable[[], int]) -> Garbage:
    """``item`` with its size and whether it is in use, or, behind a symbolic link, with the link (and
    neither size nor lock looked at: both would go through the link)."""
    link = _link_on_the_way(root, item)
    if link is not None:
        return dataclasses.replace(item, link=link)
    return dataclasses.replace(item, bytes=size(), in_use=_in_use(root, item.key, item.committed))


def _guard(root: CacheRoot, key: str, committed: bool) -> Location:
    """The lock that says a store is in use: readers' lease (committed) or the build lock (partial)."""
    return root.lease_location(key) if committed else root.lock_location(key)


def _in_use(root: CacheRoot, key: str, committed: bool) -> bool:
    with exclusive_if_free(_guard(root, key, committed)) as free:
        return not free


def find_garbage(root: CacheRoot, referenced: Iterable[str], include_partial: bool = False) -> list[Garbage]:
    """Views and caches no run record references, then the segments no remaining view reads (and,
    optionally, unfinished stores). A view in use is kept, and so are its segments."""
    from unipt.pipeline.cache.space import segments_needed, views_of

    check_root_folders(root)
    keep = set(referenced)
    views = views_of(root)
    found = []
    for key in root.keys():
        if key in keep:
            continue
        item = Garbage(key, 0, True, kind=VIEW_KIND if key in views else "cache")
        found.append(_found(root, item, root.location(key).size))
    removed = {item.key for item in found if not (item.in_use or item.link)}
    needed = segments_needed({key: attrs for key, attrs in views.items() if key not in removed})
    for space in root.spaces():
        link = root.space_location(space).symlink_below(root.root)
        if link is not None:  # its segments lie elsewhere: not this root's to look at
            found.append(Garbage(space, 0, True, kind=SPACE_KIND, link=link))
            continue
        for segment in root.segments(space):
            if segment not in needed:
                item = Garbage(segment, 0, True, kind=SEGMENT_KIND, space=space)
                found.append(_found(root, item, root.segment_location(space, segment).size))
    if include_partial:
        found += [
            _found(root, Garbage(key, 0, False), root.partial_location(key).size)
            for key in root.partial_keys()
        ]
    return found


def remove(root: CacheRoot, item: Garbage) -> bool:
    """Remove a store unless it is in use (then False): checked and renamed away under one lock, so a
    reader either got its lease first (and the store stays) or waits and then finds no store. The lock
    file goes with it."""
    location = item.location(root)
    if item.link is not None or _link_on_the_way(root, item) is not None:
        return False
    with exclusive_if_free(_guard(root, item.key, item.committed)) as free:
        if not free:
            return False
        if item.kind == SEGMENT_KIND and _still_read(root, item):
            return False
        location = _to_trash(root, location, item.key)
    location.remove()
    return True


def _to_trash(root: CacheRoot, location: Location, name: str) -> Location:
    """Rename a local store into the root's trash and return where it went (an object store: as is).
    Renaming first makes the key disappear in one step, so no reader meets a half-deleted store.
    A link on the way (one planted since gc looked) is refused: the rename would move what it points at."""
    if not (location.is_local and location.exists()):
        return location
    check_root_folders(root)
    link = location.symlink_below(root.root)
    if link is not None:
        raise UniptError(f"{link} became a symbolic link while gc ran; remove the link and run gc again")
    return move_to_trash(root, location, name)


def remove_segments(root: CacheRoot, space: str, segment_ids: list[str]) -> list[str]:
    """Remove these segments of ``space`` (e.g. the ones a compaction replaced) unless a reader holds
    one or a view still reads it; returns the ids kept (`unipt cache gc` takes them once free)."""
    kept = []
    for segment in segment_ids:
        size = root.segment_location(space, segment).size()
        if not remove(root, Garbage(segment, size, True, kind=SEGMENT_KIND, space=space)):
            kept.append(segment)
    return kept


def remove_empty_spaces(root: CacheRoot) -> list[str]:
    """Remove activation spaces left with no segment and no view (gc took their last segment);
    returns their ids. Each is checked and removed under the space's build lock, so an extraction
    that is about to write a segment into it either waits for this or runs first and keeps it."""
    from unipt.pipeline.cache.space import views_of

    removed = []
    for space in root.spaces():
        if root.space_location(space).symlink_below(root.root) is not None:
            continue  # reported by find_garbage; never followed
        with exclusive_if_free(root.lock_location(space)) as free:
            if not free or root.segments(space) or views_of(root, space):
                continue
            _to_trash(root, root.space_location(space), space).remove()
            removed.append(space)
    return removed


def _still_read(root: CacheRoot, item: Garbage) -> bool:
    """Whether a committed view reads the segment after all: one written since gc looked (its extraction
    held the segment's lease until the view was committed, so under our lease the answer is final)."""
    from unipt.pipeline.cache.space import segments_needed, views_of

    return item.key in segments_needed(views_of(root, item.space))


def trash_leftovers(root: CacheRoot) -> dict[str, int]:
    """What a gc or compaction killed between moving a store into ``.trash/`` and deleting it left
    there: entry name -> bytes (links are not entries of ours: left alone, and not followed to size them)."""
    trash = root.root.child(TRASH_DIR)
    if not root.root.is_local or trash.symlink_below(root.root) is not None:
        return {}
    return {
        name: _size_if_there(trash.child(name))
        for name in trash.listdir()
        if trash.child(name).symlink_below(root.root) is None
    }


def _size_if_there(location: Location) -> int:
    try:
        return location.size()
    except FileNotFoundError:  # another gc is deleting it right now
        return 0


def empty_trash(root: CacheRoot) -> dict[str, int]:
    """Delete the leftovers in ``.trash/`` (see :func:`trash_leftovers`) and return them. Nothing there
    is read by anyone: a store is renamed into the trash only once no reader holds it."""
    check_root_folders(root)
    leftovers = trash_leftovers(root)
    for name in leftovers:
        root.root.child(TRASH_DIR, name).remove()  # tolerates a concurrent gc deleting it first
    return leftovers


def sweep_lock_files(root: CacheRoot) -> int:
    """Delete lock files nobody holds (left by processes that were killed); returns how many.

    Builds and readers delete their own lock files when they let go (see :mod:`unipt.pipeline.cache.locks`); a
    killed process cannot, and leaves an empty file in ``.partial/`` or ``.leases/``. Each is taken
    without waiting and deleted while held, so a lock someone holds, or takes meanwhile, is untouched.
    """
    removed = 0
    for lock_file in _lock_files(root):
        if lock_file.symlink_below(root.root) is None:  # a link: see linked_lock_files
            with exclusive_if_free(lock_file) as free:
                removed += free
    return removed


def linked_lock_files(root: CacheRoot) -> list[str]:
    """Lock files that are symbolic links (unipt never makes one): gc leaves them and says so."""
    return [link for lock_file in _lock_files(root) if (link := lock_file.symlink_below(root.root))]


def _lock_files(root: CacheRoot) -> list[Location]:
    if not root.root.is_local:
        return []
    return [
        root.root.child(folder, name)
        for folder in (PARTIAL_DIR, LEASES_DIR)
        for name in root.root.child(folder).listdir()
        if name.endswith(LOCK_SUFFIX) and is_key(name.removesuffix(LOCK_SUFFIX))
    ]
