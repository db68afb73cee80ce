"""The Zarr cache: exact round trip, chunk-aligned shards, atomic visibility, refusal of foreign stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import KEY, build_cache, example_table, write_scaled_store
from unipt.pipeline import FORMAT_VERSION
from unipt.pipeline.cache.attrs import parse_attrs
from unipt.pipeline.cache.checksums import CHECKSUMS_FILE, digest
from unipt.pipeline.cache.layout import (
    METADATA_FILE,
    SEGMENT_KIND,
    VIEW_KIND,
    LayerSpec,
    StoreLayout,
    written_ranges,
)
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cache.writer import CacheBuilder, write_shard
from unipt.pipeline.cli.app import main
from unipt.pipeline.errors import CacheDamaged, UniptError


def test_round_trip_is_exact(tmp_path):
    root = CacheRoot(tmp_path)
    lengths = [5, 1, 9, 3, 7, 2, 8]
    tokens, _ = build_cache(root, lengths, {0: 4, 2: 6})
    reader = open_cache(root.location(KEY))
    assert reader.num_examples == 7 and reader.layers == [0, 2]
    assert reader.attrs["total_tokens"] == sum(lengths)
    assert reader.examples.column("length").to_pylist() == lengths
    for layer in (0, 2):
        for i in range(7):
            got = reader.read_example(i, layer)
            assert got.dtype == np.float16
            np.testing.assert_array_equal(got, tokens[layer][i])


def test_shard_row_spans_start_on_file_boundaries_and_never_overlap():
    layer = LayerSpec(0, 4)
    for chunks_per_file in (1, 3):
        layout = StoreLayout(
            (layer,),
            num_examples=10,
            max_length=5,
            shard_size=4,
            chunk_rows=8,
            chunks_per_file=chunks_per_file,
        )
        shards = layout.shards()
        assert [(s.example_start, s.example_stop) for s in shards] == [(0, 4), (4, 8), (8, 10)]
        spans = [layout.row_span(s, layer) for s in shards]
        assert all(base % layout.rows_per_file == 0 for base, _ in spans)
        for (base, capacity), (next_base, _) in zip(spans, spans[1:], strict=False):
            assert base + capacity <= next_base
        assert all(cap >= s.num_examples * 5 for s, (_, cap) in zip(shards, spans, strict=True))
        assert layout.total_rows(layer) == spans[-1][0] + spans[-1][1]


def test_written_ranges_are_each_shards_used_rows():
    """One range per shard with rows, empty examples and an empty shard left out: what a read checks is on
    disk, what the HDF5 export copies and what the planner reads."""
    layer = LayerSpec(0, 4)
    layout = StoreLayout((layer,), num_examples=10, max_length=5, shard_size=4, chunk_rows=8)
    offsets = layout.offsets(layer, np.array([3, 0, 2, 5, 0, 0, 0, 0, 1, 4]))  # shards at rows 0, 24, 48
    assert written_ranges(offsets) == [(0, 10), (48, 53)]
    assert written_ranges(offsets[:3]) == [(0, 5)]
    assert written_ranges(offsets[4:8]) == []
    assert layout.files_with_rows(layout.arrays()["layer_00"], offsets) == {0, 1, 6}


def test_incomplete_store_is_invisible_and_refused(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, [3, 4, 5], {0: 4}, commit=False)
    assert not root.has(KEY) and root.keys() == [] and root.partial_keys() == [KEY]
    with pytest.raises(UniptError, match="incomplete"):
        open_cache(root.partial_location(KEY))
    with pytest.raises(UniptError, match="no activation cache"):
        open_cache(root.location(KEY))


def test_commit_refuses_missing_shards(tmp_path):
    root = CacheRoot(tmp_path)
    _, layout = build_cache(root, [3, 4, 5, 6], {0: 4}, shard_size=2, commit=False)
    (tmp_path / ".partial" / KEY / "_shards" / "000001.json").unlink()
    with pytest.raises(UniptError, match=r"shards \[1\] are not written"):
        CacheBuilder(root, KEY).commit(layout, example_table(4), {})
    assert not root.has(KEY)


def test_cache_for_other_data_is_refused(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, [3, 4], {0: 4})
    open_cache(root.location(KEY), expect={"dataset_fingerprint": "f1"})
    with pytest.raises(UniptError, match="built for another dataset fingerprint"):
        open_cache(root.location(KEY), expect={"dataset_fingerprint": "f2"})


def test_other_format_version_is_refused(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, [3, 4], {0: 4})
    meta_path = tmp_path / KEY / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["format_version"] = 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(
        UniptError, match="format version 1, this unipt reads versions 2, 3, 4; re-extract it"
    ):
        open_cache(root.location(KEY))


def test_unknown_layer_is_a_clear_error(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, [3, 4], {0: 4})
    with pytest.raises(UniptError, match=r"layer 5 is not in cache"):
        open_cache(root.location(KEY)).read_example(0, 5)


def test_keys_cannot_escape_the_root(tmp_path):
    for bad in ("../etc", "ab/../../x", "", "AB" * 16):
        with pytest.raises(UniptError, match="not a hex digest"):
            CacheRoot(tmp_path).location(bad)
    for bad in ("..", "a/../../b", "/etc", "", "a\\..\\b"):
        with pytest.raises(UniptError, match="would leave"):
            CacheRoot(tmp_path).root.child(bad)


def test_partial_store_resumes_only_with_the_same_layout(tmp_path):
    root = CacheRoot(tmp_path)
    builder = CacheBuilder(root, KEY)
    layer = (LayerSpec(0, 4),)
    layout = StoreLayout(layer, num_examples=4, max_length=4, shard_size=2, chunk_rows=8)
    builder.create(layout, {})
    write_shard(builder.location, layout, layout.shards()[0], {0: np.ones((5, 4), np.float16)}, [2, 3])
    builder.create(layout, {})  # same layout: the finished shard is kept
    assert builder.finished_shards()[0]["lengths"] == [2, 3]
    for changed in (
        StoreLayout(layer, num_examples=4, max_length=4, shard_size=1, chunk_rows=8),  # shard size
        StoreLayout(layer, num_examples=4, max_length=4, shard_size=2, chunk_rows=16),  # chunk size
        StoreLayout(layer, num_examples=4, max_length=4, shard_size=2, chunk_rows=8, codec="zstd"),
    ):
        builder.create(layout, {})
        write_shard(builder.location, layout, layout.shards()[0], {0: np.ones((5, 4), np.float16)}, [2, 3])
        builder.create(changed, {})
        assert builder.finished_shards() == {}  # another layout: start over rather than mix row ranges


def test_shard_with_wrong_rows_is_refused_and_not_marked(tmp_path):
    root = CacheRoot(tmp_path)
    builder = CacheBuilder(root, KEY)
    layout = StoreLayout((LayerSpec(0, 4),), num_examples=2, max_length=4, shard_size=2, chunk_rows=8)
    builder.create(layout, {})
    with pytest.raises(UniptError, match=r"rows of shape \(4, 4\), expected \(5, 4\)"):
        write_shard(builder.location, layout, layout.shards()[0], {0: np.ones((4, 4), np.float16)}, [2, 3])
    with pytest.raises(UniptError, match="more than max_length 4"):
        write_shard(builder.location, layout, layout.shards()[0], {0: np.ones((7, 4), np.float16)}, [2, 5])
    assert builder.finished_shards() == {}


def test_interrupted_publish_is_finished_by_the_next_run(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, [3, 4], {0: 4})
    # Simulate a crash after the store was marked complete but before the rename.
    (tmp_path / ".partial").mkdir(exist_ok=True)
    shutil.move(tmp_path / KEY, tmp_path / ".partial" / KEY)
    assert not root.has(KEY)
    published = CacheBuilder(root, KEY).publish_if_committed()
    assert published == root.location(KEY) and root.has(KEY)
    assert open_cache(published).num_examples == 2


def test_reading_a_layer_subset_touches_no_other_layer(tmp_path):
    root = CacheRoot(tmp_path)
    tokens, _ = build_cache(root, [5, 1, 9, 3, 7], {0: 4, 1: 4, 2: 6})
    # Remove the other layers' files outright: any access to them would fail or return zeros.
    shutil.rmtree(tmp_path / KEY / "layer_00")
    shutil.rmtree(tmp_path / KEY / "layer_01")
    reader = open_cache(root.location(KEY))
    for i in range(5):
        np.testing.assert_array_equal(reader.read_example(i, 2), tokens[2][i])


def test_feature_maps_round_trip_with_their_grids(tmp_path):
    """CNN stages: an [H, W, C] map per image stored as H*W rows, each stage with its own grid."""
    rng = np.random.default_rng(1)
    specs = (LayerSpec(1, 3, grid=(4, 4)), LayerSpec(3, 5, grid=(2, 2)))
    layout = StoreLayout(specs, num_examples=7, max_length=1, shard_size=3, chunk_rows=8)
    maps = {s.index: rng.standard_normal((7, *s.grid, s.width)).astype(np.float16) for s in specs}
    root = CacheRoot(tmp_path)
    builder = CacheBuilder(root, KEY)
    builder.create(layout, {"label_names": ["a", "b"]})
    for shard in layout.shards():
        part = slice(shard.example_start, shard.example_stop)
        rows = {s.index: maps[s.index][part].reshape(-1, s.width) for s in specs}
        write_shard(builder.location, layout, shard, rows)
    builder.commit(layout, example_table(7), {})
    reader = open_cache(root.location(KEY))
    assert reader.attrs["grids"] == {"1": [4, 4], "3": [2, 2]}
    assert reader.examples.column("length").to_pylist() == [16] * 7
    for spec in specs:
        offsets = reader.offsets_for(spec.index)
        assert (offsets[:, 1] - offsets[:, 0] == spec.grid[0] * spec.grid[1]).all()
        for i in range(7):
            np.testing.assert_array_equal(reader.read_example(i, spec.index), maps[spec.index][i])


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [("float32", 0.0), ("float16", 1e-3), ("bfloat16", 8e-3), ("int8", 1 / 127)],
)
def test_dtypes_round_trip_within_their_precision(tmp_path, dtype, tolerance):
    root = CacheRoot(tmp_path)
    values = write_scaled_store(root, dtype)
    reader = open_cache(root.location(KEY))
    assert reader.dtype == dtype
    for i, want in enumerate(values):
        got = reader.read_example(i, 0)
        assert got.dtype == (np.float16 if dtype == "float16" else np.float32)
        # Relative to each token's largest value: that is what per-token int8 scaling preserves.
        scale = np.abs(want).max(axis=1, keepdims=True)
        assert np.abs(got.astype(np.float32) - want).max() <= tolerance * scale.max() + 1e-7
        if dtype == "int8":
            assert np.all(np.abs(got - want) <= scale / 127 * 0.5 + 1e-6)


def test_int8_store_is_about_half_of_fp16(tmp_path):
    lengths = [40] * 12
    sizes = {}
    for dtype in ("float16", "int8"):
        root = CacheRoot(tmp_path / dtype)
        build_cache(root, lengths, {0: 64}, shard_size=4, chunk_rows=64, dtype=dtype, codec="none")
        sizes[dtype] = open_cache(root.location(KEY)).nbytes_on_disk()
    assert 0.45 < sizes["int8"] / sizes["float16"] < 0.6


@pytest.mark.parametrize(
    "codec",
    [{"codec": "zstd"}, {"codec": "lz4"}, {"codec": "blosc-lz4", "shuffle": "bit"}, {"codec": "none"}],
)
def test_every_codec_and_sharding_round_trips(tmp_path, codec):
    for chunks_per_file in (1, 4):
        root = CacheRoot(tmp_path / str(chunks_per_file))
        tokens, layout = build_cache(
            root, [5, 1, 9, 3, 7, 2], {0: 4}, chunks_per_file=chunks_per_file, **codec
        )
        reader = open_cache(root.location(KEY))
        assert reader.layout.chunks_per_file == chunks_per_file
        for i in range(6):
            np.testing.assert_array_equal(reader.read_example(i, 0), tokens[0][i])
        chunk_files = [
            p for p in (tmp_path / str(chunks_per_file) / KEY / "layer_00" / "c").rglob("*") if p.is_file()
        ]
        # Rows 0-14 and 32-43 hold tokens: 4 chunks of 8 rows, or 2 files of 4 chunks with sharding.
        assert len(chunk_files) == (2 if chunks_per_file == 4 else 4)


def test_a_truncated_chunk_stops_reading_with_a_pointer_to_verify(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, [5, 1, 9, 3, 7], {0: 4})
    chunk = tmp_path / KEY / "layer_00" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:7])
    reader = open_cache(root.location(KEY))
    with pytest.raises(UniptError, match=r"layer_00 rows 0-5 could not be read .*unipt cache verify"):
        reader.read_example(0, 0)


# --- reads that decode nothing (pipeline/cache/chunk_reader.py)
# ---------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int8"])
def test_uncompressed_local_reads_come_out_of_memory_maps_equal_to_zarrs(tmp_path, dtype):
    root = CacheRoot(tmp_path)
    build_cache(root, [5, 1, 9, 3, 7, 2, 8, 4], {0: 4, 1: 6}, codec="none", dtype=dtype)
    reader = open_cache(root.location(KEY))
    assert reader._mapped is not None  # the default codec of a local store takes the mapped path
    rng = np.random.default_rng(0)
    names = ["layer_00", "layer_01"] + (["layer_00_scale"] if dtype == "int8" else [])
    for name in names:
        rows = reader._specs[name].shape[0]
        for _ in range(40):  # ranges within a chunk, across chunks, over unwritten (all-zero) chunks
            start = int(rng.integers(0, rows))
            stop = int(rng.integers(start, rows + 1))
            mapped = reader.read_stored(name, start, stop)
            through_zarr = reader._array(name)[start:stop]
            assert mapped.dtype == through_zarr.dtype
            np.testing.assert_array_equal(mapped, through_zarr)


def test_compressed_and_remote_stores_keep_the_zarr_path(tmp_path):
    root = CacheRoot(tmp_path)
    tokens, _ = build_cache(root, [5, 1, 9], {0: 4}, codec="zstd")
    reader = open_cache(root.location(KEY))
    assert reader._mapped is None
    np.testing.assert_array_equal(reader.read_example(2, 0), tokens[0][2])


def test_a_mapped_chunk_replaced_while_open_is_checked_again(tmp_path):
    root = CacheRoot(tmp_path)
    tokens, _ = build_cache(root, [5, 1, 9, 3, 7, 2], {0: 4}, codec="none")
    reader = open_cache(root.location(KEY))
    np.testing.assert_array_equal(reader.read_example(0, 0), tokens[0][0])
    chunk = tmp_path / KEY / "layer_00" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0x10  # inside example 0's rows; the trailer still matches the manifest
    chunk.unlink()
    chunk.write_bytes(bytes(data))  # a new file (inode): its verdict is not the old one's
    reader._mapped.close()
    with pytest.raises(
        UniptError, match=r"layer_00 chunk 0 \(rows 0-7\): its crc32c checksum does not match"
    ):
        reader.read_example(0, 0)


def test_a_chunk_that_is_a_symlink_is_not_followed(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, [5, 1, 9, 3, 7, 2], {0: 4}, codec="none")
    chunk = tmp_path / KEY / "layer_00" / "c" / "0" / "0"
    outside = tmp_path / "outside"
    shutil.copy(chunk, outside)  # the very bytes: only the link is wrong
    chunk.unlink()
    chunk.symlink_to(outside)
    reader = open_cache(root.location(KEY))
    with pytest.raises(UniptError, match=r"layer_00 chunk 0 \(rows 0-7\): the chunk file cannot be opened"):
        reader.read_example(0, 0)


# --- typed root attributes (cache/attrs.py) ---------------------------------------------------------------


def _root_attrs(store: Path) -> dict:
    return json.loads((store / METADATA_FILE).read_text())["attributes"]


@pytest.mark.slow
def test_a_real_segment_and_view_parse_to_typed_attributes_and_keep_every_one(shared_extraction):
    segment_attrs = _root_attrs(shared_extraction.segment)
    view_attrs = _root_attrs(shared_extraction.view)
    segment = parse_attrs(segment_attrs, "segment")
    view = parse_attrs(view_attrs, "view")
    # Nothing read is dropped or changed: dumped back, each is the dict on disk.
    assert segment.model_dump(exclude_unset=True) == segment_attrs
    assert view.model_dump(exclude_unset=True) == view_attrs
    assert segment.kind == SEGMENT_KIND and view.kind == VIEW_KIND
    assert segment.complete and view.complete
    assert segment.format_version == view.format_version == FORMAT_VERSION
    assert segment.space_key == view.space_key == shared_extraction.segment.parent.parent.name
    assert view.cache_key == shared_extraction.key and view.segments[0].id == shared_extraction.segment.name
    checksums = (shared_extraction.segment / CHECKSUMS_FILE).read_bytes()
    assert [ref.checksums for ref in view.segments] == [digest(checksums)]
    assert segment.dataset_fingerprint is None  # a segment belongs to its space, not to a dataset version
    assert view.dataset_fingerprint == view.key_fields["dataset_fingerprint"]
    assert segment.layers == view.layers == [0, 1, 2] and segment.tokenizer["class"] == "BertTokenizer"
    with open_cache(shared_extraction.view) as reader:
        assert reader.meta == view and reader.segments[0].meta == segment
        assert reader.meta.total_tokens == sum(reader.examples.column("length").to_pylist())
        assert reader.num_views == 1 and reader.label_names == view.label_names


def test_attributes_of_format_2_parse_with_the_defaults_readers_assumed(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, [3, 4], {0: 4})
    written = _root_attrs(tmp_path / KEY)
    with open_cache(root.location(KEY)) as reader:  # format 4, self-contained: no kind, no space
        assert reader.meta.num_examples == 2 and reader.meta.key_fields == {"dataset_fingerprint": "f1"}
        assert reader.meta.kind is None and reader.meta.segments == []
    format_2 = {name: written[name] for name in _FORMAT_2_ATTRS} | {"format_version": 2, "note": "kept"}
    old = parse_attrs(format_2, "old")
    assert old.format_version == 2 and old.layers == [0] and old.total_tokens == 7
    assert (old.kind, old.space_key, old.committed_at, old.dataset_fingerprint, old.tokenizer) == (None,) * 5
    assert (old.views, old.key_fields, old.backbone, old.segments, old.grids) == (1, {}, {}, [], {})
    assert old.model_extra == {"note": "kept"}  # a newer or older version's attribute is kept, not refused


# What a cache of format 2 has at its root (tests/test_corruption.py builds a whole one).
_FORMAT_2_ATTRS = (
    "cache_key", "complete", "label_names", "layout", "layers", "hidden_sizes", "grids", "dtype",
    "max_length", "num_examples", "total_tokens",
)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "value", "where"),
    [
        ("total_tokens", "many", "attribute total_tokens is"),
        ("complete", "yes", "attribute complete is"),
        ("views", 0, "attribute views is"),
        ("hidden_sizes", {"0": 4.5}, "attribute hidden_sizes.0 is"),
        ("segments", [{"checksums": "ab"}], "attribute segments.0.id is"),
    ],
)
def test_a_malformed_attribute_is_refused_in_one_line(tmp_path, capsys, name, value, where):
    root = CacheRoot(tmp_path)
    build_cache(root, [3, 4], {0: 4})
    path = tmp_path / KEY / METADATA_FILE
    meta = json.loads(path.read_text())
    meta["attributes"][name] = value
    path.write_text(json.dumps(meta))
    with pytest.raises(CacheDamaged, match=rf"zarr.json {where} malformed \(.+\); run `unipt cache verify"):
        open_cache(root.location(KEY))
    assert main(["cache", "info", str(tmp_path / KEY)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unipt: error: cache ") and len(err.strip().splitlines()) == 1
    assert "pydantic" not in err and "Traceback" not in err
