"""Each input through the backbone once: activation spaces, segments, views and incremental extraction.

Versions of one dataset, as in the issue: A = 90% of the examples, B = all of them, C = B with some
labels flipped, D = B with another split seed. B extracts only what A lacks; C and D extract nothing;
B trained through the incremental path gets exactly the metrics of B extracted from scratch.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline import experiment
from pipeline.cache import CacheReader, CacheRoot, ViewReader
from pipeline.cache_layout import LayerSpec, StoreLayout
from pipeline.cache_space import compact, plan_layer_subset, write_space_file, write_view
from pipeline.cache_writer import CacheBuilder, write_shard
from pipeline.config import load_config
from pipeline.errors import UniptError
from tests.conftest import make_sentiment_rows, write_config, write_csv

SPACE = "5a" * 16


def _segment(root: CacheRoot, seg: str, lengths: list[int], hashes: list[str], seed: int, **layout):
    """A committed segment of SPACE holding random fp16 rows for ``hashes``; returns the rows."""
    rng = np.random.default_rng(seed)
    spec = StoreLayout(
        layers=(LayerSpec(0, 4), LayerSpec(1, 4)),
        num_examples=len(lengths),
        max_length=max(lengths),
        shard_size=3,
        chunk_rows=8,
        **layout,
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


def test_a_view_over_two_segments_reads_every_range_like_the_concatenated_examples(tmp_path):
    root = CacheRoot(tmp_path)
    first = _segment(root, "01" * 16, [3, 5, 2, 7, 4, 1, 6], [f"h{i}" for i in range(7)], seed=0)
    second = _segment(root, "02" * 16, [2, 8, 3], ["h7", "h8", "h9"], seed=1)
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
    readers = {s: CacheReader(root.segment_location(SPACE, s)) for s in ("01" * 16, "02" * 16)}
    where = {h: ("01" * 16, i) for i, h in enumerate(f"h{i}" for i in range(7))}
    where.update({h: ("02" * 16, i) for i, h in enumerate(["h7", "h8", "h9"])})
    key = "ee" * 16
    write_view(root, key, {"key_fields": {"dataset_fingerprint": "v"}, "label_names": ["a", "b"]},
               examples, hashes, where, readers)  # fmt: skip
    for reader in readers.values():
        reader.lease.release()

    view = CacheReader(root.location(key))
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
    assert not result.cache_hit and result.examples == 20
    result.release()

    for version in ("C", "D"):
        prep = versions(version, "shared")
        assert prep.key != b.key and prep.dataset.fingerprint != b.dataset.fingerprint
        result = experiment.extract(prep, progress=False)
        err = capfd.readouterr().err
        assert "all 200 inputs reused; writing the view only (no backbone forward pass)" in err
        assert result.cache_hit and result.examples == 0 and result.seconds < 5
        result.release()

    root = b.cache_root
    (space,) = root.spaces()
    assert len(root.segments(space)) == 2 and len(root.keys()) == 4  # two segments, four views
    view = CacheReader(root.location(b.key))
    assert view.num_examples == 202 and len(view.segments) == 2
    copies = view.examples.to_pandas().set_index("example_id")
    assert tuple(copies.loc["dup-3", ["segment", "row"]]) == tuple(copies.loc["r0003", ["segment", "row"]])
    view.lease.release()


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
        CacheReader(incremental.cache_root.location(incremental.key)),
        CacheReader(scratch.cache_root.location(scratch.key)),
    )
    assert len(a.segments) == 2 and len(b.segments) == 1
    # Bit for bit: an input's rows do not depend on the inputs batched beside it (hf_text's padding).
    _assert_same_rows(a, b)
    a.lease.release()
    b.lease.release()
    first = experiment.train(incremental, progress=False)
    second = experiment.train(scratch, progress=False)
    assert _untimed(first.metrics) == _untimed(second.metrics)
    for mine, theirs in zip(first.history, second.history, strict=True):
        assert _untimed(mine) == _untimed(theirs)


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
        CacheReader(root.location(subset.key)),
        CacheReader(scratch.cache_root.location(scratch.key)),
    )
    assert a.layers == b.layers == [0, 2] and a.attrs["space_layers"] == [0, 1, 2]
    assert a.attrs["key_fields"] == b.attrs["key_fields"]
    _assert_same_rows(a, b)
    a.lease.release()
    b.lease.release()
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
    from pipeline.cli import main

    root = CacheRoot(tmp_path)
    first = _segment(root, "01" * 16, [3, 5, 2, 7], ["h0", "h1", "h2", "h3"], seed=0)
    second = _segment(root, "02" * 16, [2, 8], ["h4", "h5"], seed=1)
    rows = [first[0][i] for i in range(4)] + [second[0][i] for i in range(2)]
    hashes = ["h5", "h0", "h1", "h4", "h2", "h3"]
    examples = pa.table(
        {"example_id": [f"e{i}" for i in range(6)], "label": [0, 1] * 3, "split": ["train"] * 6}
    )
    readers = {s: CacheReader(root.segment_location(SPACE, s)) for s in ("01" * 16, "02" * 16)}
    where = {f"h{i}": ("01" * 16, i) for i in range(4)} | {"h4": ("02" * 16, 0), "h5": ("02" * 16, 1)}
    write_view(
        root, "ee" * 16, {"key_fields": {}, "label_names": ["a", "b"]}, examples, hashes, where, readers
    )
    for reader in readers.values():
        reader.lease.release()
    expected = np.concatenate([rows[int(h[1])] for h in hashes])

    assert main(["cache", "compact", SPACE, "--cache-root", str(tmp_path)]) == 0
    (merged,) = root.segments(SPACE)
    view = CacheReader(root.location("ee" * 16))
    assert [s.location.name for s in view.segments] == [merged]
    np.testing.assert_array_equal(view.read_rows(0, 0, len(expected)), expected)
    view.lease.release()
    assert main(["cache", "ls", "--cache-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"view of space {SPACE} (1 segment(s))" in out and f"segment {merged}" in out

    # No run references the view: gc removes it, and then the segment no view reads any more.
    args = ["--runs-root", str(tmp_path / "runs"), "--registry", str(tmp_path / "r.sqlite")]
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
        view = CacheReader(root.location(key))
        try:
            assert view.layers == [1] and view.hidden_sizes == {1: 4} and view.attrs["space_layers"] == [0, 1]
            assert view.attribute_problems() == [] and view.metadata_problems() == []
            np.testing.assert_array_equal(view.read_rows(1, 0, len(expected)), expected)
            with pytest.raises(UniptError, match=r"layer 0 is not in cache .* \(stored layers: \[1\]\)"):
                view.read_rows(0, 0, 1)
        finally:
            view.lease.release()

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
        reader = CacheReader(root.segment_location(space, segment))
        held += reader.examples.column("input_hash").to_pylist()
        reader.lease.release()
    assert len(held) == len(set(held)) == 160

    # Each version reads exactly what it would have read extracted alone.
    for name, prep in zip("xy", shared, strict=True):
        alone = prepare(name, f"alone-{name}")
        with experiment.extract(alone, progress=False):
            pass
        assert alone.key == prep.key
        mine, theirs = CacheReader(root.location(prep.key)), CacheReader(alone.cache_root.location(alone.key))
        assert mine.num_examples == theirs.num_examples == 100
        _assert_same_rows(mine, theirs)
        mine.lease.release()
        theirs.lease.release()
