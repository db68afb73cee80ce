"""HDF5 export: the same rows at the same positions, and training on it gives the same numbers."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from tests.conftest import KEY, Extraction, build_cache
from unipt.pipeline import experiment
from unipt.pipeline.cache.hdf5 import HDF5CacheReader, export_hdf5
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cli.app import main
from unipt.pipeline.config import load_config
from unipt.pipeline.errors import UniptError
from unipt.pipeline.runs.records import read_run_record

COMPARED = ("test_acc", "val_acc", "test_f1", "probe_test_acc", "probe_val_acc", "best_epoch")


def test_export_copies_every_example_exactly(tmp_path):
    lengths = [5, 1, 9, 3, 7, 2, 8]
    for dtype in ("float16", "int8"):
        root = CacheRoot(tmp_path / dtype)
        build_cache(root, lengths, {0: 4, 2: 6}, dtype=dtype, splits=["train"] * 4 + ["val"] * 3)
        zarr_reader = open_cache(root.location(KEY))
        out = export_hdf5(zarr_reader, tmp_path / f"{dtype}.h5", compression="gzip")
        h5_reader = HDF5CacheReader(out)
        assert h5_reader.layers == [0, 2] and h5_reader.dtype == dtype
        assert h5_reader.examples.equals(zarr_reader.examples)
        # The same examples, packed: the store's shards reserve rows they never fill, the file keeps none.
        np.testing.assert_array_equal(
            np.diff(h5_reader.offsets, axis=1), np.diff(zarr_reader.offsets, axis=1)
        )
        assert h5_reader.offsets[-1, 1] == sum(lengths) and h5_reader.offsets[0, 0] == 0
        with h5py.File(out) as f:
            stored = zarr_reader.stored_array("layer_00").shape[0]
            assert f["layer_00"].shape == (sum(lengths), 4) and stored > sum(lengths)
            if dtype == "int8":
                assert f["layer_00_scale"].shape[0] == sum(lengths)
        for layer in (0, 2):
            for i in range(len(lengths)):
                np.testing.assert_array_equal(
                    h5_reader.read_example(i, layer), zarr_reader.read_example(i, layer)
                )
        with h5py.File(out) as f:  # readable by any HDF5 tool: plain datasets and a JSON attribute
            assert json.loads(f.attrs["unipt"])["cache_key"] == KEY
            assert f["layer_02"].shape[1] == 6 and f["examples/split"].shape == (len(lengths),)


def _flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


@pytest.mark.parametrize("compression", ["none", "lzf"])
def test_a_damaged_hdf5_copy_stops_reading_in_one_line(tmp_path, compression, capsys):
    """Every activation chunk carries a Fletcher-32 checksum and the small datasets a sha256 recorded at
    export: a flipped byte in either is an error naming the dataset, never a changed number. (Before,
    a byte flipped in an lzf chunk decoded to a different activation and training went on.)"""
    root = CacheRoot(tmp_path)
    build_cache(root, [5, 1, 9, 3, 7, 2, 8], {0: 4, 2: 6}, splits=["train"] * 4 + ["val"] * 3)
    out = export_hdf5(open_cache(root.location(KEY)), tmp_path / "copy.h5", compression=compression)
    HDF5CacheReader(out).read_example(2, 2)  # the undamaged copy reads
    with h5py.File(out) as f:
        chunk = f["layer_02"].id.get_chunk_info(0)
        label = f["examples/label"].id.get_offset()
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(out.read_bytes())
    _flip_byte(damaged, chunk.byte_offset + chunk.size // 2)
    with pytest.raises(UniptError, match=r"HDF5 cache .*damaged.h5: layer_02 rows \d+-\d+ is damaged \("):
        HDF5CacheReader(damaged).read_example(2, 2)

    labels = tmp_path / "labels.h5"
    labels.write_bytes(out.read_bytes())
    _flip_byte(labels, label)
    with pytest.raises(UniptError, match="examples/label is damaged .*sha256 does not match"):
        HDF5CacheReader(labels)

    # `unipt cache verify` reads every dataset of the copy through the same checks.
    capsys.readouterr()
    assert main(["cache", "verify", str(out), "--no-progress"]) == 0
    assert "datasets match their checksums" in capsys.readouterr().out
    for bad, names in ((damaged, "layer_02 rows"), (labels, "examples/label")):
        assert main(["cache", "verify", str(bad), "--no-progress"]) == 1
        printed = capsys.readouterr()
        assert [line for line in printed.out.splitlines() if line.startswith("DAMAGED")], printed.out
        assert names in printed.out and "cannot be trusted" in printed.err

    # A copy exported before the checksums existed still opens, and says once that it is unchecked.
    capsys.readouterr()
    with h5py.File(damaged, "r+") as f:
        del f.attrs["unipt_digests"]
    HDF5CacheReader(damaged)
    HDF5CacheReader(damaged)
    said = capsys.readouterr().err
    assert said.count("was exported without checksums") == 1, said
    assert main(["cache", "verify", str(damaged), "--no-progress"]) == 2  # nothing to verify against
    said = capsys.readouterr().err
    assert said.startswith("unipt: error:") and "nothing to verify" in said and said.count("\n") == 1


def test_export_never_overwrites(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, [3, 4], {0: 4})
    target = tmp_path / "out.h5"
    target.write_text("precious")
    with pytest.raises(UniptError, match="already exists"):
        export_hdf5(open_cache(root.location(KEY)), target)
    assert target.read_text() == "precious"


def test_not_a_cache_file_is_a_clear_error(tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(UniptError, match="not a unipt cache"):
        open_cache(plain)
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(UniptError, match="not a readable HDF5 file"):
        open_cache(tmp_path / "junk.h5")


@pytest.mark.e2e
def test_training_on_the_hdf5_export_gives_the_same_results(shared_extraction: Extraction, tmp_path, capsys):
    config = shared_extraction.config
    registry = ["--registry", str(tmp_path / "registry.sqlite")]
    overrides = [f"storage.runs_root={tmp_path / 'runs'}", f"storage.registry={registry[1]}"]
    prep = experiment.prepare(load_config(config, ["train.epochs=3", *overrides]))
    zarr_path = experiment.extract(prep, progress=False).path  # the shared cache: a hit
    from_zarr = experiment.train(prep, progress=False)

    out = tmp_path / "cache.h5"
    code = main(
        [
            "cache",
            "export",
            prep.key,
            "--cache-root",
            str(prep.cache_root),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0 and out.is_file()
    from_h5 = experiment.train(prep, open_cache(out, expect={"backbone": prep.key_fields["backbone"]}))
    for name in COMPARED:
        assert from_h5.metrics[name] == from_zarr.metrics[name], name
    assert [h["train_loss"] for h in from_h5.history] == [h["train_loss"] for h in from_zarr.history]

    # The command a user runs: `unipt train CONFIG --cache file.h5`, recorded with the file as its source.
    runs = tmp_path / "runs-h5"
    capsys.readouterr()
    code = main(
        [
            "train",
            str(config),
            "--set",
            "train.epochs=3",
            "--runs-root",
            str(runs),
            *registry,
            "--cache",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    record = read_run_record(next(runs.iterdir()))
    assert (
        record["cache"]["path"] == str(out) and record["metrics"]["test_acc"] == from_zarr.metrics["test_acc"]
    )
    assert str(zarr_path) != str(out)


@pytest.mark.slow
def test_hdf5_export_of_another_dataset_is_refused_for_training(shared_extraction: Extraction, tmp_path):
    with open_cache(shared_extraction.view) as reader:
        out = export_hdf5(reader, tmp_path / "c.h5")
    with pytest.raises(UniptError, match="built for another dataset fingerprint"):
        open_cache(out, expect={"dataset_fingerprint": "0" * 64})


@pytest.mark.parametrize("count", [10**12, 10**6])
def test_an_hdf5_copy_that_lies_about_its_size_is_refused_before_reading(tmp_path, count):
    """num_examples edited into the copy's attributes: refused in one line, before it sizes a read."""
    root = CacheRoot(tmp_path / "cache")
    build_cache(root, [5, 1, 9, 3, 7, 2, 8], {0: 4})
    with open_cache(root.location(KEY)) as reader:
        out = export_hdf5(reader, tmp_path / "copy.h5")
    with h5py.File(out, "r+") as f:
        attrs = json.loads(f.attrs["unipt"])
        attrs["num_examples"] = attrs["layout"]["num_examples"] = count
        f.attrs["unipt"] = json.dumps(attrs)
    says = (
        "not to be trusted: the cache layout says num_examples"
        if count > 2**31
        else r"has shape \[7\], not \[1000000\]"
    )
    with pytest.raises(UniptError, match=says):
        HDF5CacheReader(out)
    with h5py.File(out, "r+") as f:
        f.attrs["unipt"] = json.dumps([1, 2])
    with pytest.raises(UniptError, match="not the JSON objects unipt writes"):
        HDF5CacheReader(out)
