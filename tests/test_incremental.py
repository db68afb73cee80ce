"""Each input through the backbone once: activation spaces, segments, views and incremental extraction.

Versions of one dataset, as in the issue: A = 90% of the examples, B = all of them, C = B with some
labels flipped, D = B with another split seed. B extracts only what A lacks; C and D extract nothing;
B trained through the incremental path gets exactly the metrics of B extracted from scratch.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tests.conftest import make_sentiment_rows, write_config, write_csv
from unipt.pipeline import experiment
from unipt.pipeline.cache.layout import LayerSpec, StoreLayout
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.reader import CacheReader
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cache.space import compact, plan_layer_subset, write_space_file, write_view
from unipt.pipeline.cache.view import ViewReader, gather
from unipt.pipeline.cache.writer import CacheBuilder, write_shard
from unipt.pipeline.config import load_config
from unipt.pipeline.errors import CacheDamaged, CacheMissing, UniptError

SPACE = "5a" * 16


def _segment(root: CacheRoot, seg: str, lengths: list[int], hashes: list[str], seed: int, **layout):
    """A committed segment of SPACE holding random fp16 rows for ``hashes``; returns the rows."""
    rng = np.random.default_rng(seed)
    spec = StoreLayout(
        layers=(LayerSpec(0, 4), LayerSpec(1, 4)),
        num_examples=len(lengths),
        max_length=max(lengths),
        **{"shard_size": 3, "chunk_rows": 8, **layout},
    )
    builder = CacheBuilder(root, seg, final=root.segment_location(SPACE, seg))
    builder.create(spec, {"kind": "segment", "space_key": SPACE, "key_fields": {}})
    rows = {layer: [rng.standard_normal((n, 4)).astype(np.float16) for n in lengths] for layer in (0, 1)}
    for shard in spec.shards():
        part = slice(shard.example_start, shard.example_stop)
        write_shard(
            builder.location,
            spec,
            shard,
            {layer: np.concatenate(r[part]) for layer, r in rows.items()},
            lengths[part],
        )
    builder.commit(spec, pa.table({"input_hash": hashes}), {})
    return rows


# Compressed segments are read in runs through Zarr; uncompressed ones give exactly the rows (memory maps).
@pytest.mark.parametrize("codec", ["blosc-zstd", "none"])
def test_a_view_over_two_segments_reads_every_range_like_the_concatenated_examples(tmp_path, codec):
    root = CacheRoot(tmp_path)
    first = _segment(root, "01" * 16, [3, 5, 2, 7, 4, 1, 6], [f"h{i}" for i in range(7)], seed=0, codec=codec)
    second = _segment(root, "02" * 16, [2, 8, 3], ["h7", "h8", "h9"], seed=1, codec=codec)
    by_hash = {f"h{i}": (first[0][i], first[1][i]) for i in range(7)}
    by_hash.update({f"h{7 + i}": (second[0][i], second[1][i]) for i in range(3)})
    # The version's order interleaves the segments and repeats an input (identical inputs share rows).
    hashes = ["h8", "h0", "h1", "h7", "h2", "h2", "h9", "h3", "h4", "h5", "h6"]
    examples = pa.table(
        {
            "example_id": [f"e{i}" for i in range(len(hashes))],
            "label": [i % 2 for i in range(len(hashes))],
            "split": ["train"] * 6 + ["test"] * 5,
        }
    )
    readers = {s: open_cache(root.segment_location(SPACE, s)) for s in ("01" * 16, "02" * 16)}
    where = {h: ("01" * 16, i) for i, h in enumerate(f"h{i}" for i in range(7))}
    where.update({h: ("02" * 16, i) for i, h in enumerate(["h7", "h8", "h9"])})
    key = "ee" * 16
    write_view(root, key, {"key_fields": {"dataset_fingerprint": "v"}, "label_names": ["a", "b"]},
               examples, hashes, where, readers)  # fmt: skip
    for reader in readers.values():
        reader.lease.release()

    view = open_cache(root.location(key))
    assert isinstance(view, ViewReader) and len(view.segments) == 2
    assert view.split_indices("test").tolist() == [6, 7, 8, 9, 10]
    for layer in (0, 1):
        whole = np.concatenate([by_hash[h][layer] for h in hashes])
        offsets = view.offsets_for(layer)
        assert offsets[0, 0] == 0 and (offsets[1:, 0] == offsets[:-1, 1]).all()  # back to back
        for i, h in enumerate(hashes):
            np.testing.assert_array_equal(view.read_example(i, layer), by_hash[h][layer])
        for start in range(0, len(whole), 3):
            for stop in range(start, len(whole) + 1, 4):
                np.testing.assert_array_equal(view.read_rows(layer, start, stop), whole[start:stop])
    view.lease.release()


@pytest.fixture(scope="module")
def versions(tmp_path_factory, tiny_bert_dir):
    """CSV files of versions A, B, C and D, and a config writer over one shared cache root."""
    folder = tmp_path_factory.mktemp("versions")
    rows = make_sentiment_rows(200)
    rows += [dict(rows[3], id="dup-3"), dict(rows[4], id="dup-4")]  # identical inputs, new ids
    flipped = [dict(r, label="neg" if r["label"] == "pos" else "pos") if i % 50 == 0 else r
               for i, r in enumerate(rows)]  # fmt: skip
    files = {
        "A": write_csv(folder / "a.csv", [r for i, r in enumerate(rows) if i % 10 != 7]),
        "B": write_csv(folder / "b.csv", rows),
        "C": write_csv(folder / "c.csv", flipped),
    }

    def config(version: str, root: str, *overrides: str):
        source = files["B" if version == "D" else version]
        path = write_config(folder / f"{version}-{root}.yaml", str(source), str(tiny_bert_dir), folder / root,
                            train={"epochs": 3})  # fmt: skip
        extra = ["dataset.split.seed=1"] if version == "D" else []
        return experiment.prepare(load_config(path, [*extra, *overrides]))

    return config


@pytest.mark.slow
def test_versions_extract_only_what_no_segment_holds(ray_session, versions, capfd):
    a = versions("A", "shared")
    result = experiment.extract(a, progress=False)
    assert not result.cache_hit and len(a.dataset) == 182 and result.examples == 180  # 2 copies share rows
    result.release()
    capfd.readouterr()

    b = versions("B", "shared")
    result = experiment.extract(b, progress=False)
    err = capfd.readouterr().err
    assert "cache: 180 of 200 inputs reused; extracting 20" in err
    assert f"cache miss {b.key}: extracted 20 examples" in err and "view written over" not in err
    assert not result.cache_hit and result.examples == 20
    result.release()

    for version in ("C", "D"):
        prep = versions(version, "shared")
        assert prep.key != b.key and prep.dataset.fingerprint != b.dataset.fingerprint
        result = experiment.extract(prep, progress=False)
        err = capfd.readouterr().err
        assert "all 200 inputs reused; writing the view only (no backbone forward pass)" in err
        # The log says what the record will: nothing extracted (a hit), not a "cache miss".
        assert f"cache {prep.key}: view written over existing activations, nothing extracted" in err
        assert "cache miss" not in err
        assert result.cache_hit and result.examples == 0 and result.seconds < 5
        result.release()

    root = b.cache_root
    (space,) = root.spaces()
    assert len(root.segments(space)) == 2 and len(root.keys()) == 4  # two segments, four views
    view = open_cache(root.location(b.key))
    assert view.num_examples == 202 and len(view.segments) == 2
    copies = view.examples.to_pandas().set_index("example_id")
    assert tuple(copies.loc["dup-3", ["segment", "row"]]) == tuple(copies.loc["r0003", ["segment", "row"]])
    view.lease.release()


@pytest.mark.e2e
def test_b_incremental_trains_exactly_like_b_from_scratch(ray_session, versions):
    incremental = versions("B", "shared")  # A then B, extracted by the test above (or here, if run alone)
    experiment.extract(versions("A", "shared"), progress=False).release()
    with experiment.extract(incremental, progress=False):
        pass
    scratch = versions("B", "scratch")
    with experiment.extract(scratch, progress=False):
        pass
    assert incremental.key == scratch.key
    a, b = (
        open_cache(incremental.cache_root.location(incremental.key)),
        open_cache(scratch.cache_root.location(scratch.key)),
    )
    assert len(a.segments) == 2 and len(b.segments) == 1
    # Bit for bit: an input's rows do not depend on the inputs batched beside it (hf_text's padding).
    _assert_same_rows(a, b)
    a.lease.release()
    b.lease.release()
    # In the dataset's order (view order 1) the batches do not depend on how the inputs were extracted.
    # (Order 2, the default, follows the segments' rows, which the two extractions laid out differently.)
    first = experiment.train(versions("B", "shared", "train.view_order=1"), progress=False)
    second = experiment.train(versions("B", "scratch", "train.view_order=1"), progress=False)
    assert _untimed(first.metrics) == _untimed(second.metrics)
    for mine, theirs in zip(first.history, second.history, strict=True):
        assert _untimed(mine) == _untimed(theirs)


@pytest.mark.e2e
def test_a_layer_subset_of_a_stored_space_is_a_view_that_trains_like_a_subset_extraction(
    ray_session, versions, capfd
):
    """backbone.layers a subset of a stored space's layers: a view over those layers (no backbone forward,
    nothing new in the root), with its own key, and the same rows and training as an extraction of them."""
    wide = versions("B", "layers", "backbone.layers=[0,1,2]")
    experiment.extract(wide, progress=False).release()
    root = wide.cache_root
    (space,) = root.spaces()
    segments = root.segments(space)
    capfd.readouterr()

    subset = versions("B", "layers", "backbone.layers=[0,2]")
    assert subset.key != wide.key and subset.key_fields["layers"] == [0, 2]
    result = experiment.extract(subset, progress=False)
    err = capfd.readouterr().err
    assert "with layers [0, 1, 2]; writing a view of layers [0, 2] (no backbone forward pass)" in err
    assert result.cache_hit and result.shards_run == 0 and result.examples == 0
    result.release()
    assert root.spaces() == [space] and root.segments(space) == segments  # no segment, no space added
    with experiment.extract(subset, progress=False) as again:  # a rerun finds its view
        assert again.cache_hit and again.path == root.location(subset.key)

    scratch = versions("B", "layers-scratch", "backbone.layers=[0,2]")
    with experiment.extract(scratch, progress=False):
        pass
    assert scratch.key == subset.key
    a, b = (
        open_cache(root.location(subset.key)),
        open_cache(scratch.cache_root.location(scratch.key)),
    )
    assert a.layers == b.layers == [0, 2] and a.attrs["space_layers"] == [0, 1, 2]
    assert a.attrs["key_fields"] == b.attrs["key_fields"]
    _assert_same_rows(a, b)
    a.close()
    b.close()
    first = experiment.train(subset, progress=False)
    second = experiment.train(scratch, progress=False)
    assert _untimed(first.metrics) == _untimed(second.metrics)
    for mine, theirs in zip(first.history, second.history, strict=True):
        assert _untimed(mine) == _untimed(theirs)


def _assert_same_rows(mine: CacheReader, theirs: CacheReader) -> None:
    """Every stored layer of two caches: the same offsets and the same rows, bit for bit."""
    for layer in mine.layers:
        np.testing.assert_array_equal(mine.offsets_for(layer), theirs.offsets_for(layer))
        total = int(mine.offsets_for(layer)[-1, 1])
        np.testing.assert_array_equal(mine.read_rows(layer, 0, total), theirs.read_rows(layer, 0, total))


def _untimed(values: dict) -> dict:
    return {
        name: value for name, value in values.items() if "seconds" not in name and not name.endswith("_s")
    }


def test_compact_merges_segments_rewrites_views_and_gc_removes_what_no_view_reads(tmp_path, capsys):
    from unipt.pipeline.cli.app import main

    root = CacheRoot(tmp_path)
    first = _segment(root, "01" * 16, [3, 5, 2, 7], ["h0", "h1", "h2", "h3"], seed=0)
    second = _segment(root, "02" * 16, [2, 8], ["h4", "h5"], seed=1)
    rows = [first[0][i] for i in range(4)] + [second[0][i] for i in range(2)]
    hashes = ["h5", "h0", "h1", "h4", "h2", "h3"]
    examples = pa.table(
        {"example_id": [f"e{i}" for i in range(6)], "label": [0, 1] * 3, "split": ["train"] * 6}
    )
    readers = {s: open_cache(root.segment_location(SPACE, s)) for s in ("01" * 16, "02" * 16)}
    where = {f"h{i}": ("01" * 16, i) for i in range(4)} | {"h4": ("02" * 16, 0), "h5": ("02" * 16, 1)}
    write_view(
        root, "ee" * 16, {"key_fields": {}, "label_names": ["a", "b"]}, examples, hashes, where, readers
    )
    for reader in readers.values():
        reader.lease.release()
    expected = np.concatenate([rows[int(h[1])] for h in hashes])

    assert main(["cache", "compact", SPACE, "--cache-root", str(tmp_path)]) == 0
    (merged,) = root.segments(SPACE)
    view = open_cache(root.location("ee" * 16))
    assert [s.location.name for s in view.segments] == [merged]
    np.testing.assert_array_equal(view.read_rows(0, 0, len(expected)), expected)
    view.lease.release()
    assert main(["cache", "ls", "--cache-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"view of space {SPACE} (1 segment(s))" in out and f"segment {merged}" in out

    # No run references the view: gc removes it, and then the segment no view reads any more.
    args = ["--runs-root", str(tmp_path / "runs"), "--registry", str(tmp_path / "r.sqlite"), "--no-registry"]
    assert main(["cache", "gc", "--cache-root", str(tmp_path), *args, "--yes"]) == 0
    assert root.keys() == [] and root.segments(SPACE) == []
    # ...and the space it leaves empty, so nothing of it stays on disk.
    assert f"removing space {SPACE}" in capsys.readouterr().out
    assert root.spaces() == [] and not root.space_location(SPACE).exists()


def test_a_layer_subset_view_reads_only_its_layers_and_stays_one_through_compaction(tmp_path):
    root = CacheRoot(tmp_path)
    first = _segment(root, "01" * 16, [3, 5, 2], ["h0", "h1", "h2"], seed=0)
    second = _segment(root, "02" * 16, [4, 6], ["h3", "h4"], seed=1)
    rows = [first[1][i] for i in range(3)] + [second[1][i] for i in range(2)]
    hashes = ["h4", "h0", "h3", "h1", "h2"]
    examples = pa.table(
        {"example_id": [f"e{i}" for i in range(5)], "label": [0, 1, 0, 1, 0], "split": ["train"] * 5}
    )
    readers = {s: CacheReader(root.segment_location(SPACE, s)) for s in ("01" * 16, "02" * 16)}
    where = {f"h{i}": ("01" * 16, i) for i in range(3)} | {"h3": ("02" * 16, 0), "h4": ("02" * 16, 1)}
    key = "ee" * 16
    write_view(root, key, {"key_fields": {}, "label_names": ["a", "b"]}, examples, hashes, where, readers,
               layers=[1])  # fmt: skip
    for reader in readers.values():
        reader.lease.release()
    expected = np.concatenate([rows[int(h[1])] for h in hashes])

    def check() -> None:
        view = open_cache(root.location(key))
        try:
            assert view.layers == [1] and view.hidden_sizes == {1: 4} and view.attrs["space_layers"] == [0, 1]
            assert view.attribute_problems() == [] and view.metadata_problems() == []
            np.testing.assert_array_equal(view.read_rows(1, 0, len(expected)), expected)
            with pytest.raises(UniptError, match=r"layer 0 is not in cache .* \(stored layers: \[1\]\)"):
                view.read_rows(0, 0, 1)
        finally:
            view.close()

    check()
    compact(root, SPACE, progress=False)
    assert len(root.segments(SPACE)) == 3  # the merged one; the old two wait for gc
    check()


def test_only_a_space_equal_but_for_more_layers_and_holding_every_input_serves_a_layer_subset(tmp_path):
    root = CacheRoot(tmp_path)
    _segment(root, "01" * 16, [3, 5, 2], ["h0", "h1", "h2"], seed=0)  # layers 0 and 1
    stored = {"backbone": {"weights_sha256": "w"}, "layers": [0, 1], "max_length": 8}
    write_space_file(root, SPACE, stored)

    def plan(hashes: list[str] = ["h2", "h0"], **change):  # noqa: B006
        fields = {**stored, "dataset_fingerprint": "v", "layers": [1], **change}
        found = plan_layer_subset(root, fields, hashes)
        if found is not None:
            found.release()
        return found

    found = plan()
    assert found is not None and found.space == SPACE and found.layers == [1] and not found.missing
    assert found.where == {"h2": ("01" * 16, 2), "h0": ("01" * 16, 0)}
    assert plan(layers=[0, 1]) is not None  # every stored layer: an ordinary view (write_view drops layers)
    assert plan(["h2", "h9"]) is None  # an input the space does not hold
    assert plan(layers=[1, 2]) is None  # a layer it does not store
    assert plan(layers="all") is None
    assert plan(max_length=16) is None  # any other byte-deciding field differs: another space's rows
    assert plan(backbone={"weights_sha256": "other"}) is None


@pytest.mark.slow
def test_concurrent_extractions_of_overlapping_versions_build_each_input_once(
    ray_session, tmp_path, tiny_bert_dir, capfd
):
    """Two versions sharing 40 of their inputs, extracted at the same moment into one root: the space's
    lock lets one build while the other waits, which then extracts only what the first did not."""
    import threading

    rows = make_sentiment_rows(160, seed=3)
    sources = {"x": write_csv(tmp_path / "x.csv", rows[:100]), "y": write_csv(tmp_path / "y.csv", rows[60:])}

    def prepare(name: str, root: str) -> experiment.Prepared:
        path = write_config(tmp_path / f"{name}-{root}.yaml", str(sources[name]), str(tiny_bert_dir),
                            tmp_path / root)  # fmt: skip
        return experiment.prepare(load_config(path))

    shared = [prepare("x", "shared"), prepare("y", "shared")]
    start = threading.Barrier(2)
    results: list = [None, None]
    errors: list[BaseException] = []

    def extract(index: int) -> None:
        start.wait()
        try:
            results[index] = experiment.extract(shared[index], progress=False)
        except BaseException as exc:  # reported by the assertion below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=extract, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    err = capfd.readouterr().err
    assert "another extraction in activation space" in err and "waiting for it" in err
    # 160 distinct inputs between them, each through the backbone once: 100 by the first, 60 by the second.
    assert sorted(r.examples for r in results) == [60, 100]
    for result in results:
        result.release()

    root = shared[0].cache_root
    (space,) = root.spaces()
    held = []
    for segment in root.segments(space):
        reader = open_cache(root.segment_location(space, segment))
        held += reader.examples.column("input_hash").to_pylist()
        reader.lease.release()
    assert len(held) == len(set(held)) == 160

    # Each version reads exactly what it would have read extracted alone.
    for name, prep in zip("xy", shared, strict=True):
        alone = prepare(name, f"alone-{name}")
        with experiment.extract(alone, progress=False):
            pass
        assert alone.key == prep.key
        mine, theirs = open_cache(root.location(prep.key)), open_cache(alone.cache_root.location(alone.key))
        assert mine.num_examples == theirs.num_examples == 100
        _assert_same_rows(mine, theirs)
        mine.lease.release()
        theirs.lease.release()


def _two_views_of_one_segment(root: CacheRoot) -> tuple[str, str, dict]:
    """One segment of inputs h0..h9 (rows 0..9), and two versions over it that differ only in labels and
    example ids: the second's id order (ids hash the label) is a permutation of the segment's rows."""
    rows = _segment(root, "01" * 16, [3, 5, 2, 7, 4, 1, 6, 2, 8, 3], [f"h{i}" for i in range(10)], seed=0)
    (segment,) = root.segments(SPACE)
    where = {f"h{i}": (segment, i) for i in range(10)}
    splits = ["train"] * 7 + ["test"] * 3
    source = ["h0", "h1", "h2", "h3", "h4", "h5", "h6", "h7", "h8", "h9"]
    relabelled = ["h5", "h2", "h6", "h0", "h3", "h1", "h4", "h9", "h7", "h8"]  # same splits, new order
    keys = ("e1" * 16, "e2" * 16)
    with open_cache(root.segment_location(SPACE, segment)) as reader:
        for key, hashes, label in zip(keys, (source, relabelled), (0, 1), strict=True):
            examples = pa.table(
                {
                    "example_id": [f"{key[:2]}-{h}" for h in hashes],
                    "label": [(int(h[1]) + label) % 2 for h in hashes],
                    "split": splits,
                }
            )
            attrs = {"key_fields": {"dataset_fingerprint": key}, "label_names": ["a", "b"]}
            write_view(root, key, attrs, examples, hashes, where, {segment: reader})
    return keys[0], keys[1], rows


def test_view_order_2_reads_segment_rows_in_order_whatever_the_labels_and_ids(tmp_path):
    root = CacheRoot(tmp_path)
    source, relabelled, rows = _two_views_of_one_segment(root)
    with (
        open_cache(root.location(source), view_order=2) as a,
        open_cache(root.location(relabelled), view_order=2) as b,
    ):
        for view in (a, b):
            assert view.examples.column("row").to_pylist() == list(range(10))  # the segment's order
            assert view.split_indices("test").tolist() == [7, 8, 9]
        assert a.labels().tolist() != b.labels().tolist()  # only the labels differ
        for layer in (0, 1):
            total = int(a.offsets_for(layer)[-1, 1])
            np.testing.assert_array_equal(a.offsets_for(layer), b.offsets_for(layer))
            np.testing.assert_array_equal(a.read_rows(layer, 0, total), np.concatenate(rows[layer]))
            np.testing.assert_array_equal(b.read_rows(layer, 0, total), np.concatenate(rows[layer]))
        # Each example keeps its own label and rows in the new order.
        hashes = b.examples.column("input_hash").to_pylist()
        assert [int(h[1]) for h in hashes] == list(range(10))
        np.testing.assert_array_equal(b.read_example(4, 0), rows[0][4])
    # Order 1 (runs made before order 2) is the order as written: the relabelled version's permutation.
    with open_cache(root.location(relabelled), view_order=1) as old:
        assert old.examples.column("row").to_pylist() == [5, 2, 6, 0, 3, 1, 4, 9, 7, 8]
        np.testing.assert_array_equal(old.read_example(0, 0), rows[0][5])


def test_a_view_reads_only_chunks_holding_rows_it_uses():
    # Part of a segment's examples (3 rows each; chunks of 8 rows): dense, then sparse. The runs gathered
    # must not span a chunk of rows the view does not use, so a partial view decodes only its own chunks.
    chunk = 8
    starts = np.concatenate([np.arange(0, 200, 8), np.arange(200, 400, 40)]).astype(np.int64)
    starts = starts[::-1].copy()  # the view's order need not be the rows'
    counts = np.full(len(starts), 3, dtype=np.int64)
    used = np.zeros(400, dtype=bool)
    for s in starts:
        used[s : s + 3] = True
    fetched = []

    def fetch(segment: int, lo: int, hi: int) -> np.ndarray:
        fetched.append((lo, hi))
        return np.arange(lo, hi)[:, None]

    rows = gather(np.zeros(len(starts), dtype=np.int64), starts, counts, fetch, lambda _: chunk - 1)
    np.testing.assert_array_equal(rows[:, 0], np.concatenate([np.arange(s, s + 3) for s in starts]))
    for lo, hi in fetched:
        for first in range((lo // chunk) * chunk, hi, chunk):
            assert used[max(first, lo) : min(first + chunk, hi)].any(), (lo, hi, first)
    assert len(fetched) < len(starts)  # nearby pieces still share a read


def test_a_quarter_views_epoch_reads_only_the_rows_it_uses(tmp_path, monkeypatch):
    # A view of every fourth input of an uncompressed (memory-mapped) segment: a shuffled training epoch
    # copies exactly its examples' rows out of the segment, once each, not the runs of chunks around them.
    from unipt.train.loader import CacheBatches

    root = CacheRoot(tmp_path)
    lengths = np.random.default_rng(3).integers(1, 9, 64).tolist()
    rows = _segment(root, "01" * 16, lengths, [f"h{i}" for i in range(64)], seed=0, codec="none",
                    shard_size=64, chunk_rows=32)  # fmt: skip
    (segment,) = root.segments(SPACE)
    members = list(range(0, 64, 4))
    examples = pa.table(
        {"example_id": [f"e{m:02d}" for m in members], "label": [m % 2 for m in members],
         "split": ["train"] * len(members)}
    )  # fmt: skip
    with open_cache(root.segment_location(SPACE, segment)) as reader:
        attrs = {"key_fields": {"dataset_fingerprint": "q"}, "label_names": ["a", "b"]}
        write_view(root, "e1" * 16, attrs, examples, [f"h{m}" for m in members],
                   {f"h{i}": (segment, i) for i in range(64)}, {segment: reader})  # fmt: skip
    copied = {0: 0, 1: 0}

    def counted(read):
        def spy(name, *where):
            out = read(name, *where)
            if name.startswith("layer_"):
                copied[int(name.rsplit("_", 1)[1])] += len(out) if out is not None else 0
            return out

        return spy

    def counted_pieces(read):
        def spy(name, *where):
            pieces = read(name, *where)
            if name.startswith("layer_"):
                copied[int(name.rsplit("_", 1)[1])] += sum(len(rows) for _, rows in pieces)
            return pieces

        return spy

    with open_cache(root.location("e1" * 16), view_order=2) as view:
        (seg,) = view.segments
        monkeypatch.setattr(seg, "read_stored", counted(seg.read_stored))
        monkeypatch.setattr(seg, "take_stored", counted(seg.take_stored))
        # Rows handed out as views into the maps (one run of the segment) count as read too.
        monkeypatch.setattr(seg, "_mapped_pieces", counted_pieces(seg._mapped_pieces))
        batches = CacheBatches(view, "train", [0, 1], batch_size=3, shuffle=True, block_examples=5,
                               reader_threads=1, prefetch_blocks=0)  # fmt: skip
        seen = []
        for batch in batches.epoch(0):
            for i, index in enumerate(batch.indices):
                member = int(view.examples.column("input_hash")[int(index)].as_py()[1:])
                for layer in (0, 1):
                    n = lengths[member]
                    np.testing.assert_array_equal(batch.hidden[layer][i, :n].float().numpy(),
                                                  rows[layer][member].astype(np.float32))  # fmt: skip
                seen.append(member)
        batches.close()
    assert sorted(seen) == members
    used = sum(lengths[m] for m in members)
    assert copied == {0: used, 1: used}  # a compact cache of these examples would copy as many


def test_a_damaged_chunk_taken_by_a_view_is_one_clear_error(tmp_path):
    # The gather that copies only a view's rows out of memory maps checks each chunk like a range read.
    root = CacheRoot(tmp_path)
    lengths = [3, 5, 2, 7, 4, 1, 6, 2, 8, 3]
    _segment(root, "01" * 16, lengths, [f"h{i}" for i in range(10)], seed=0, codec="none", shard_size=10)
    (segment,) = root.segments(SPACE)
    members = [0, 2, 5, 9]  # apart in the segment: not one run
    examples = pa.table(
        {"example_id": [f"e{m}" for m in members], "label": [0, 1, 0, 1], "split": ["train"] * 4}
    )
    with open_cache(root.segment_location(SPACE, segment)) as reader:
        attrs = {"key_fields": {"dataset_fingerprint": "d"}, "label_names": ["a", "b"]}
        write_view(root, "e1" * 16, attrs, examples, [f"h{m}" for m in members],
                   {f"h{i}": (segment, i) for i in range(10)}, {segment: reader})  # fmt: skip
    chunk = root.segment_location(SPACE, segment).child("layer_00", "c", "0", "0")
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0xFF  # one bit pattern changed in the first row: the crc32c no longer matches
    chunk.write_bytes(bytes(raw))
    with open_cache(root.location("e1" * 16), view_order=2) as view:
        total = int(view.offsets_for(0)[-1, 1])
        with pytest.raises(
            CacheDamaged, match=r"layer_00 chunk 0 .*crc32c checksum does not match.*cache verify"
        ):
            view.read_rows(0, 0, total)


def test_closing_a_view_lets_gc_remove_it_and_its_segment(tmp_path, capsys):
    from unipt.pipeline.cli.app import main

    root = CacheRoot(tmp_path / "cache")
    source, relabelled, _ = _two_views_of_one_segment(root)
    args = [
        "cache",
        "gc",
        "--yes",
        "--cache-root",
        str(tmp_path / "cache"),
        "--runs-root",
        str(tmp_path / "runs"),
    ]
    args += ["--registry", str(tmp_path / "registry.sqlite"), "--no-registry"]
    with open_cache(root.location(source)) as view:
        assert isinstance(view, ViewReader) and view.lease.held
        assert main(args) == 0
        out = capsys.readouterr().out
        assert f"skipping {source} (view): a running process is reading it" in out
        assert root.keys() == [source] and root.segments(SPACE)  # its segment stays too
    assert not view.lease.held and not any((tmp_path / "cache" / ".leases").glob("*.lock"))
    assert main(args) == 0
    assert root.keys() == [] and root.segments(SPACE) == []


def test_errors_are_typed_missing_or_damaged(tmp_path):
    root = CacheRoot(tmp_path)
    source, _, _ = _two_views_of_one_segment(root)
    with pytest.raises(CacheMissing, match="no activation cache at"):
        open_cache(tmp_path / "nothing-here")
    (segment,) = root.segments(SPACE)
    examples = root.segment_location(SPACE, segment).child("examples.parquet")
    original = examples.read_bytes()
    examples.write_bytes(original[:-9] + b"x" + original[-8:])  # one byte changed
    with pytest.raises(CacheDamaged, match="differs from its checksum"):
        open_cache(root.location(source))
    examples.write_bytes(original)
    open_cache(root.location(source)).close()  # whole again
    root.segment_location(SPACE, segment).remove()
    with pytest.raises(CacheMissing, match=f"view over segment {segment} .* copy the whole cache root"):
        open_cache(root.location(source))
    assert issubclass(CacheMissing, UniptError) and issubclass(CacheDamaged, UniptError)  # one CLI line
    assert not any((tmp_path / ".leases").glob("*.lock"))  # a failed open holds no lease


def views_over_two_segments(root: CacheRoot, keys: list[str]) -> None:
    """Two segments of the activation space SPACE (4 and 2 inputs) and, for each of ``keys``, a view over
    all 6 inputs in an order that mixes the segments."""
    _segment(root, "01" * 16, [3, 5, 2, 7], ["h0", "h1", "h2", "h3"], seed=0)
    _segment(root, "02" * 16, [2, 8], ["h4", "h5"], seed=1)
    examples = pa.table(
        {"example_id": [f"e{i}" for i in range(6)], "label": [0, 1] * 3, "split": ["train"] * 6}
    )
    readers = {s: CacheReader(root.segment_location(SPACE, s)) for s in ("01" * 16, "02" * 16)}
    where = {f"h{i}": ("01" * 16, i) for i in range(4)} | {"h4": ("02" * 16, 0), "h5": ("02" * 16, 1)}
    hashes = ["h5", "h0", "h1", "h4", "h2", "h3"]
    for key in keys:
        write_view(root, key, {"key_fields": {}, "label_names": ["a", "b"]}, examples, hashes, where, readers)
    for reader in readers.values():
        reader.lease.release()


def test_compaction_moves_the_registered_root_digest_of_a_view_that_runs_read(tmp_path, capsys):
    """Compaction rewrites a view (same examples, same activations, another layout): runs that read the
    view as it was now name its new root digest, so `train` and `rerun` keep accepting it. A run that had
    recorded another digest (the view changed after it) keeps that one: compaction launders nothing."""
    from unipt.pipeline.cache.checksums import stored_root_digest
    from unipt.pipeline.cli.app import main
    from unipt.pipeline.runs.registry import Registry

    root = CacheRoot(tmp_path)
    views_over_two_segments(root, ["ee" * 16, "dd" * 16])
    before = stored_root_digest(root.location("ee" * 16))
    registry = tmp_path / "r.sqlite"
    with Registry(registry) as runs:
        for run_id, key, digest in (("read", "ee" * 16, before), ("other", "dd" * 16, "0" * 64)):
            record = {"run_id": run_id, "config": {}, "cache": {"key": key, "root_digest": digest}}
            runs.register(record)

    assert main(["cache", "compact", SPACE, "--cache-root", str(tmp_path), "--registry", str(registry)]) == 0
    assert f"runs of view {'ee' * 16} now name its compacted root digest" in capsys.readouterr().out
    after = stored_root_digest(root.location("ee" * 16))
    assert after != before
    with Registry(registry, create=False) as runs:
        assert runs.cache_digests("ee" * 16) == {after: ["read"]}
        assert runs.cache_digests("dd" * 16) == {"0" * 64: ["other"]}
