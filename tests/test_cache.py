"""The Zarr cache: exact round trip, chunk-aligned shards, atomic visibility, refusal of foreign stores."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.cache import CacheBuilder, CacheReader, CacheRoot, plan_shards, write_shard
from pipeline.errors import UniptError
from tests.conftest import KEY, build_cache


def test_round_trip_is_exact(tmp_path):
    root = CacheRoot(tmp_path)
    lengths = [5, 1, 9, 3, 7, 2, 8]
    tokens, _ = build_cache(root, lengths, {0: 4, 2: 6})
    reader = CacheReader(root.path(KEY))
    assert reader.num_examples == 7 and reader.layers == [0, 2]
    assert reader.attrs["total_tokens"] == sum(lengths)
    assert reader.examples.column("length").to_pylist() == lengths
    for layer in (0, 2):
        for i in range(7):
            got = reader.read_example(i, layer)
            assert got.dtype == np.float16
            np.testing.assert_array_equal(got, tokens[layer][i])


def test_shards_start_on_chunk_boundaries():
    shards = plan_shards(num_examples=10, shard_size=4, max_tokens=5, chunk_rows=8)
    assert [s.row_base % 8 for s in shards] == [0, 0, 0]
    assert [(s.example_start, s.example_stop) for s in shards] == [(0, 4), (4, 8), (8, 10)]
    for a, b in zip(shards, shards[1:], strict=False):
        assert a.row_base + a.row_capacity == b.row_base
        assert a.row_capacity >= a.num_examples * 5


def test_incomplete_store_is_invisible_and_refused(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, [3, 4, 5], {0: 4}, commit=False)
    assert not root.has(KEY) and root.keys() == []
    with pytest.raises(UniptError, match="incomplete"):
        CacheReader(root.partial_path(KEY))
    with pytest.raises(UniptError, match="no activation cache"):
        CacheReader(root.path(KEY))


def test_commit_refuses_missing_shards(tmp_path):
    root = CacheRoot(tmp_path)
    _, shards = build_cache(root, [3, 4, 5, 6], {0: 4}, shard_size=2, commit=False)
    (root.partial_path(KEY) / "_shards" / "000001.json").unlink()
    with pytest.raises(UniptError, match=r"shards \[1\] are not written"):
        CacheBuilder(root, KEY).commit(
            shards, pa.table({"example_id": list("abcd"), "label": [0, 1, 0, 1], "split": ["train"] * 4}), {}
        )


def test_cache_for_other_data_is_refused(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, [3, 4], {0: 4})
    CacheReader(root.path(KEY), expect={"dataset_fingerprint": "f1"})
    with pytest.raises(UniptError, match="built for another dataset fingerprint"):
        CacheReader(root.path(KEY), expect={"dataset_fingerprint": "f2"})


def test_unknown_layer_is_a_clear_error(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, [3, 4], {0: 4})
    with pytest.raises(UniptError, match=r"layer 5 is not in cache"):
        CacheReader(root.path(KEY)).read_example(0, 5)


def test_keys_cannot_escape_the_root(tmp_path):
    with pytest.raises(UniptError, match="not a hex digest"):
        CacheRoot(tmp_path).path("../etc")


def test_partial_store_resumes_only_with_the_same_layout(tmp_path):
    root = CacheRoot(tmp_path)
    builder = CacheBuilder(root, KEY)
    shards = plan_shards(4, 2, max_tokens=4, chunk_rows=8)
    builder.create({0: 4}, shards, 8, "float16", 3, {})
    write_shard(builder.path, shards[0], {0: np.ones((5, 4), np.float16)}, [2, 3])
    builder.create({0: 4}, shards, 8, "float16", 3, {})  # same layout: the finished shard is kept
    assert builder.finished_shards() == {0: [2, 3]}
    other_plan = plan_shards(4, 1, max_tokens=4, chunk_rows=8)  # another shard size
    builder.create({0: 4}, other_plan, 8, "float16", 3, {})
    assert builder.finished_shards() == {}  # another layout: start over rather than mix row ranges
    builder.create({0: 4}, other_plan, 8, "float16", 3, {})
    write_shard(builder.path, other_plan[0], {0: np.ones((2, 4), np.float16)}, [2])
    builder.create({0: 4}, other_plan, 16, "float16", 3, {})  # another chunk size
    assert builder.finished_shards() == {}
