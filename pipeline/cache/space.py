"""Activation spaces: which inputs a space's segments hold, writing views over them, and compaction.

The format is specified in ``docs/cache-format.md``. The extraction driver plans with :func:`plan_space`
(which inputs are held, by which segment and row; which must still be extracted), builds one new segment for
the rest with :class:`~unipt.pipeline.cache.writer.CacheBuilder`, then writes the dataset version's view with
:func:`write_view`, all under the space's build lock.
"""

from __future__ import annotations

import contextlib
import io
import json
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unipt.pipeline import FORMAT_VERSION
from unipt.pipeline.cache.checksums import CHECKSUMS_FILE, digest, seal
from unipt.pipeline.cache.encoding import has_scale
from unipt.pipeline.cache.identity import same_space_but_layers, space_key
from unipt.pipeline.cache.layout import (
    EXAMPLES_FILE,
    METADATA_FILE,
    VIEW_KIND,
    ShardSpec,
    StoreLayout,
    layer_array_name,
    view_column,
)
from unipt.pipeline.cache.layout import scale_array_name as scale_name
from unipt.pipeline.cache.locks import ReadLease, exclusive
from unipt.pipeline.cache.publish import replace
from unipt.pipeline.cache.reader import CacheReader
from unipt.pipeline.cache.root import PARTIAL_DIR, SPACE_FILE, CacheRoot, is_complete, read_attrs
from unipt.pipeline.cache.view import gather
from unipt.pipeline.cache.writer import CacheBuilder, write_shard
from unipt.pipeline.errors import UniptError
from unipt.pipeline.hashing import sha256_json
from unipt.pipeline.log import say, utc_timestamp
from unipt.pipeline.storage import Location

# Attributes a view copies from its segments: what the backbone and the stored rows are.
_SHARED_ATTRS = ("backbone", "tokenizer", "layers", "hidden_sizes", "grids", "dtype", "max_length")


def segment_id(space: str, input_hashes: list[str]) -> str:
    """A new segment's id: its space and exactly the inputs it holds, in order. The same extraction
    after a crash gets the same id, and so resumes the same partial store."""
    return sha256_json({"space": space, "inputs": input_hashes})[:32]


@dataclass
class SpacePlan:
    """What a dataset version needs from its space: where each held input is, and what is missing."""

    space: str
    readers: dict[str, CacheReader]  # segment id -> its reader (holding a read lease)
    where: dict[str, tuple[str, int]]  # input hash -> (segment id, example row in it)
    missing: list[int]  # table positions of the first example of each input no segment holds
    unique: int  # distinct inputs of the version
    # The layers a view written from this plan exposes, when the space stores more (a layer subset served
    # from a wider space, :func:`plan_layer_subset`); None: all of the space's layers.
    layers: list[int] | None = None

    @property
    def reused(self) -> int:
        return self.unique - len(self.missing)

    def release(self) -> None:
        for reader in self.readers.values():
            reader.close()


def plan_space(root: CacheRoot, space: str, hashes: list[str]) -> SpacePlan:
    """Which of ``hashes`` (one per example) the space's segments hold, and the first position of each
    input none holds. Each segment read is opened (checked) and leased, so `unipt cache gc` keeps it
    until the view over it is written and the lease handed on."""
    wanted = set(hashes)
    readers: dict[str, CacheReader] = {}
    where: dict[str, tuple[str, int]] = {}
    try:
        for segment in root.segments(space):
            location = root.segment_location(space, segment)
            try:
                reader = CacheReader(location)
            except UniptError:
                if is_complete(location):
                    raise
                continue  # a gc removed it between the listing and the lease
            if not is_complete(reader.location):
                reader.close()
                continue
            used = False
            for row, value in enumerate(reader.examples.column("input_hash").to_pylist()):
                if value in wanted and value not in where:
                    where[value] = (segment, row)
                    used = True
            if used:
                readers[segment] = reader
            else:
                reader.close()
    except BaseException:
        for reader in readers.values():
            reader.close()
        raise
    seen: set[str] = set()
    missing = []
    for position, value in enumerate(hashes):
        if value not in where and value not in seen:
            missing.append(position)
        seen.add(value)
    return SpacePlan(space, readers, where, missing, len(seen))


def plan_layer_subset(root: CacheRoot, fields: dict[str, Any], hashes: list[str]) -> SpacePlan | None:
    """A plan over another space of ``root`` that holds every one of ``hashes`` with a superset of the
    layers ``fields`` asks for, all else equal: a config that keeps fewer of the stored layers is then a
    view over those layers, with no backbone forward. None when no space qualifies.

    The space's ``space.json`` (key fields, no dataset fingerprint) must equal ``fields``' but for
    ``layers``; the stored layers are its segments' (``layers: all`` resolves there). A space missing any
    input is passed over: mixing spaces in one view would mix layer sets.
    """
    wanted = fields.get("layers")
    if not isinstance(wanted, list):  # "all": only a space of exactly these layers holds it
        return None
    own = space_key(fields)
    for space in root.spaces():
        if space == own:
            continue
        stored = _space_fields(root, space)
        if stored is None or not same_space_but_layers(fields, stored):
            continue
        if isinstance(stored.get("layers"), list) and not set(wanted) <= set(stored["layers"]):
            continue
        plan = plan_space(root, space, hashes)
        have = next(iter(plan.readers.values())).layers if plan.readers else []
        if plan.missing or not set(wanted) <= set(have):
            plan.release()
            continue
        plan.layers = list(wanted)
        return plan
    return None


def _space_fields(root: CacheRoot, space: str) -> dict[str, Any] | None:
    """``space.json``'s key fields, or None when it is missing or unreadable (such a space is not used)."""
    try:
        doc = json.loads(root.space_location(space).child(SPACE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    fields = doc.get("key_fields") if isinstance(doc, dict) else None
    if not isinstance(fields, dict) or doc.get("space_key") != space:
        return None
    return fields


def write_space_file(root: CacheRoot, space: str, fields: dict[str, Any]) -> None:
    """``space.json``: what the space's activations depend on (written once, for `unipt cache ls`)."""
    location = root.space_location(space).child(SPACE_FILE)
    if not location.exists():
        doc = {"format_version": FORMAT_VERSION, "space_key": space, "key_fields": fields}
        location.write_text(json.dumps(doc, indent=2, sort_keys=True))


def virtual_layout(segment: StoreLayout, num_examples: int, layers: list[int] | None = None) -> StoreLayout:
    """A view's layout: its segments' settings over one shard of all its examples, so that
    ``offsets()`` gives the back-to-back virtual rows (see :mod:`unipt.pipeline.cache.view`); only ``layers``
    of the segments' when given (a layer-subset view)."""
    data = segment.to_json()
    data.update(num_examples=num_examples, shard_size=max(1, num_examples))
    if layers is not None:
        data["layers"] = [spec for spec in data["layers"] if spec["index"] in layers]
    return StoreLayout.from_json(data)


def _subset_attrs(attrs: dict[str, Any], layers: list[int]) -> dict[str, Any]:
    """The shared attributes of a view that exposes only ``layers`` of its segments'."""
    out = dict(attrs)
    out["layers"] = [layer for layer in attrs["layers"] if layer in layers]
    for name in ("hidden_sizes", "grids"):
        if name in attrs:
            out[name] = {k: v for k, v in attrs[name].items() if int(k) in layers}
    return out


def write_view(
    root: CacheRoot,
    key: str,
    attrs: dict[str, Any],
    examples: pa.Table,
    hashes: list[str],
    where: dict[str, tuple[str, int]],
    readers: dict[str, CacheReader],
    views: list[list[str]] | None = None,
    layers: list[int] | None = None,
) -> Location:
    """Write (or rewrite) the view ``key``: ``examples`` (example_id, label, split) in the dataset's
    order, each pointed at the segment row holding its input. Atomic: built beside the root and renamed
    into place locally; on object stores ``zarr.json`` (with ``complete: true``) is written last.

    ``views`` (augmented views 1.., :mod:`unipt.pipeline.data.augment`) gives each example's input hash
    in each further view: its columns get the view's number as suffix (:func:`view_column`). ``layers`` (a
    subset of the segments' layers) makes it a view of those layers only (:func:`plan_layer_subset`)."""
    columns = [hashes, *(views or [])]
    order = list(dict.fromkeys(where[h][0] for column in columns for h in column))  # by first use
    segments = {s: readers[s] for s in order}
    table = _view_table(examples, columns, where, segments)
    first = segments[order[0]]
    if layers is not None and list(layers) == list(first.layers):
        layers = None  # every stored layer: an ordinary view
    shared = {name: first.attrs[name] for name in _SHARED_ATTRS if name in first.attrs}
    view_attrs = {
        **(shared if layers is None else _subset_attrs(shared, layers)),
        **attrs,
        **_own_attrs(key, table, segments, layers, len(columns)),
    }
    return _commit_view(root, key, table, view_attrs)


def _view_table(
    examples: pa.Table,
    columns: list[list[str]],
    where: dict[str, tuple[str, int]],
    segments: dict[str, CacheReader],
) -> pa.Table:
    """The view's ``examples.parquet``: each example's id, label and split, then per augmented view (0
    first) its input's length, hash, segment (an index into ``segments``, in their order) and row there."""
    index = {segment: i for i, segment in enumerate(segments)}
    lengths_of = {s: reader.examples.column("length").to_numpy() for s, reader in segments.items()}
    table = examples.select(["example_id", "label", "split"])
    for view, column in enumerate(columns):
        segment = np.array([index[where[h][0]] for h in column], dtype=np.int32)
        row = np.array([where[h][1] for h in column], dtype=np.int64)
        length = np.array([lengths_of[where[h][0]][where[h][1]] for h in column], dtype=np.int32)
        for name, values in (
            ("length", pa.array(length, pa.int32())),
            ("input_hash", pa.array(column, pa.string())),
            ("segment", pa.array(segment, pa.int32())),
            ("row", pa.array(row, pa.int64())),
        ):
            table = table.append_column(view_column(name, view), values)
    return table


def _own_attrs(
    key: str, table: pa.Table, segments: dict[str, CacheReader], layers: list[int] | None, num_views: int
) -> dict[str, Any]:
    """The attributes that make a store a view: its key, its space, each segment it reads with the digest
    of that segment's manifest (a segment replaced since is refused), its virtual layout, its counts and
    ``complete: true``."""
    first = next(iter(segments.values()))
    return {
        "kind": VIEW_KIND,
        "format_version": FORMAT_VERSION,
        "cache_key": key,
        "space_key": first.meta.space_key,
        "segments": [
            {"id": s, "checksums": digest(reader.location.child(CHECKSUMS_FILE).read_bytes())}
            for s, reader in segments.items()
        ],
        "layout": virtual_layout(first.layout, table.num_rows, layers).to_json(),
        "num_examples": int(table.num_rows),
        "total_tokens": int(table.column("length").to_numpy().sum()),  # view 0's lengths
        **({"views": num_views} if num_views > 1 else {}),
        **({"space_layers": list(first.layers)} if layers is not None else {}),
        "committed_at": utc_timestamp(),
        "complete": True,
    }


def _commit_view(root: CacheRoot, key: str, table: pa.Table, view_attrs: dict[str, Any]) -> Location:
    """Write the view's examples, manifest and, last, ``zarr.json``, and publish them under ``key``."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    data = buffer.getvalue()
    meta = json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": view_attrs}, indent=2, sort_keys=True
    ).encode()
    manifest = json.dumps(seal({EXAMPLES_FILE: digest(data), METADATA_FILE: digest(meta)}, {}), indent=0)
    final = root.location(key)
    # Object stores: written in place, and `complete: true` in zarr.json, written last, is the commit.
    staging = (
        root.root.child(PARTIAL_DIR, f"view-{key}-{uuid.uuid4().hex[:8]}") if root.root.is_local else final
    )
    staging.child(EXAMPLES_FILE).write_bytes(data)
    staging.child(CHECKSUMS_FILE).write_text(manifest)
    staging.child(METADATA_FILE).write_bytes(meta)
    # A view rewritten (compaction, or a segment it named was lost): the old one goes to the trash first.
    return replace(root, staging, final, key)


def views_of(root: CacheRoot, space: str | None = None) -> dict[str, dict[str, Any]]:
    """Committed views (of ``space``, or all) -> their attributes."""
    found = {}
    for key in root.keys():
        attrs = read_attrs(root.location(key)) or {}
        if attrs.get("kind") == VIEW_KIND and (space is None or attrs.get("space_key") == space):
            found[key] = attrs
    return found


def segments_needed(views: dict[str, dict[str, Any]]) -> set[str]:
    return {str(entry["id"]) for attrs in views.values() for entry in attrs.get("segments", [])}


# ---------------------------------------------------------------------------------------------- compact


def compact(root: CacheRoot, space: str, progress: bool = True) -> Location | None:
    """Merge every segment of ``space`` into one (atomic commit) and rewrite its views to read it. The
    old segments are then read by no view: :func:`unipt.pipeline.cache.admin.remove_segments` removes them.

    Rows are copied as stored (no decode and re-encode, so int8 scales stay exact). The caller holds
    the space's build lock. Returns the new segment, or None when there is nothing to merge.
    """
    segments = root.segments(space)
    if len(segments) < 2:
        say(f"space {space} has {len(segments)} segment(s): nothing to compact")
        return None
    with contextlib.ExitStack() as held:
        readers = [held.enter_context(CacheReader(root.segment_location(space, s))) for s in segments]
        picks = _unique_inputs(readers)
        hashes = [value for _, _, value in picks]
        new_id = segment_id(space, hashes)
        held.enter_context(ReadLease(root.lease_location(new_id)))
        location = _merge_segments(root, space, new_id, readers, picks, segments)
        merged = held.enter_context(CacheReader(location))
        where = {value: (new_id, row) for row, value in enumerate(hashes)}
        for key in views_of(root, space):
            _rewrite_view(root, key, where, {new_id: merged})
    return location


def _unique_inputs(readers: list[CacheReader]) -> list[tuple[int, int, str]]:
    """Every input of the segments once, as ``(segment index, row, input hash)``, in segment then row
    order (a duplicate: the oldest segment's copy)."""
    seen: set[str] = set()
    picks: list[tuple[int, int, str]] = []
    for index, reader in enumerate(readers):
        for row, value in enumerate(reader.examples.column("input_hash").to_pylist()):
            if value not in seen:
                seen.add(value)
                picks.append((index, row, value))
    return picks


def _merge_segments(
    root: CacheRoot,
    space: str,
    new_id: str,
    readers: list[CacheReader],
    picks: list[tuple[int, int, str]],
    segments: list[str],
) -> Location:
    """Build and commit the segment ``new_id`` holding the ``picks`` rows of ``readers`` (the segments
    ``segments``, its ``compacted_from``) under its build lock, the one gc --include-partial respects."""
    first = readers[0]
    data = first.layout.to_json()
    # Every segment's row budget fits (real spaces share one max_length; images a fixed token count).
    data.update(num_examples=len(picks), max_length=max(r.layout.max_length for r in readers))
    layout = StoreLayout.from_json(data)
    builder = CacheBuilder(root, new_id, final=root.segment_location(space, new_id))
    attrs = {
        name: first.attrs[name]
        for name in ("kind", "space_key", "key_fields", "backbone", "tokenizer")
        if name in first.attrs
    }
    hashes = [value for _, _, value in picks]
    with exclusive(root.lock_location(new_id)):
        builder.create(layout, attrs)
        done = builder.finished_shards()
        seg_of = np.array([p[0] for p in picks], dtype=np.int64)
        row_of = np.array([p[1] for p in picks], dtype=np.int64)
        for shard in layout.shards():
            if shard.shard_id not in done:
                _copy_shard(builder.location, layout, shard, readers, seg_of, row_of)
        return builder.commit(
            layout, pa.table({"input_hash": pa.array(hashes, pa.string())}), {"compacted_from": segments}
        )


def _rewrite_view(
    root: CacheRoot, key: str, where: dict[str, tuple[str, int]], segments: dict[str, CacheReader]
) -> None:
    """Rewrite the view ``key`` to read its inputs where ``where`` says (the merged segment): same examples,
    labels, augmented views and layers."""
    # The view's own files are all it needs: its examples and attributes, not its segments. Strict: a
    # damaged view is refused, never resealed.
    with CacheReader(root.location(key), view_files=True) as view:
        keep = {
            name: view.attrs[name]
            for name in ("key_fields", "dataset_fingerprint", "label_names", "backbone")
            if name in view.attrs
        }
        examples = view.examples
        hashes = examples.column("input_hash").to_pylist()
        augmented = [
            examples.column(view_column("input_hash", k)).to_pylist() for k in range(1, view.num_views)
        ]
        layers = view.layers if "space_layers" in view.attrs else None  # a layer subset stays one
    write_view(root, key, keep, examples, hashes, where, segments, augmented, layers)


def _fetch(readers: list[CacheReader], name: str, index: int, lo: int, hi: int) -> np.ndarray:
    return readers[index].read_stored(name, lo, hi)


def _copy_shard(
    location: Location,
    layout: StoreLayout,
    shard: ShardSpec,
    readers: list[CacheReader],
    seg_of: np.ndarray,
    row_of: np.ndarray,
) -> None:
    picked = slice(shard.example_start, shard.example_stop)
    segs, rows = seg_of[picked], row_of[picked]
    layers, scales = {}, {}
    lengths: list[int] | None = None

    def gap(index: int) -> int:
        return readers[index].layout.rows_per_file

    for spec in layout.layers:
        starts = np.zeros(len(rows), dtype=np.int64)
        counts = np.zeros(len(rows), dtype=np.int64)
        for index, reader in enumerate(readers):
            mine = segs == index
            if mine.any():
                offsets = reader.offsets_for(spec.index)[rows[mine]]
                starts[mine], counts[mine] = offsets[:, 0], offsets[:, 1] - offsets[:, 0]
        if spec.grid is None and lengths is None:
            lengths = [int(c) for c in counts]

        layers[spec.index] = gather(
            segs, starts, counts, partial(_fetch, readers, layer_array_name(spec.index)), gap
        )
        if has_scale(layout.dtype):
            scale = partial(_fetch, readers, scale_name(spec.index))
            scales[spec.index] = gather(segs, starts, counts, scale, gap)
    write_shard(location, layout, shard, layers, lengths, scales=scales if scales else {})
