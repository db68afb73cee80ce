"""Damaged caches: each kind of corruption is named by `unipt cache verify` (exit 1) and stops `unipt train`
with one `unipt: error:` line (exit 2), no traceback, and no run recorded or registered.

One real extraction (Ray, the tiny BERT of tests/conftest.py: 60 snippets, layers 0-2, 256-row chunks) is
copied into each test's own cache root and damaged there. Every row of CORRUPTIONS is one test.
"""

from __future__ import annotations

import io
import json
import resource
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from tests.conftest import KEY, Extraction, build_cache, example_table
from unipt.pipeline.cache.admin import verify
from unipt.pipeline.cache.checksums import CHECKSUMS_FILE, digest, seal, stored_root_digest, trailers_of
from unipt.pipeline.cache.encoding import compressors, encode_rows
from unipt.pipeline.cache.layout import EXAMPLES_FILE, LayerSpec, StoreLayout
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cli.app import main
from unipt.pipeline.errors import UniptError
from unipt.pipeline.runs.registry import Registry

pytestmark = pytest.mark.faults


@pytest.fixture
def extracted(shared_extraction: Extraction) -> dict:
    """The session's shared extraction; each test copies its cache root (:func:`_copy`) before damaging it."""
    # The view names one segment of its activation space: that Zarr store is what the damage hits.
    return {
        "config": shared_extraction.config,
        "root": shared_extraction.cache_root,
        "store": shared_extraction.segment,
        "key": shared_extraction.key,
    }


def _copy(extracted: dict, tmp_path: Path) -> Path:
    """The extracted cache root copied under ``tmp_path`` (views and spaces); its segment's store."""
    shutil.copytree(
        extracted["root"], tmp_path / "cache", ignore=shutil.ignore_patterns(".partial", ".leases")
    )
    return tmp_path / "cache" / extracted["store"].relative_to(extracted["root"])


# --- the corruptions -----------------------------------------------------------------------------------


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x04
    path.write_bytes(bytes(data))


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta, indent=2))


def _chunk(store: Path, layer: int, index: int) -> Path:
    return store / f"layer_{layer:02d}" / "c" / str(index) / "0"


def _swap(store: Path) -> None:
    first, second = _chunk(store, 0, 0), _chunk(store, 0, 1)
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)


def _root_dtype(dtype: str) -> Callable[[Path], None]:
    def change(meta: dict) -> None:
        meta["attributes"]["dtype"] = dtype
        meta["attributes"]["layout"]["dtype"] = dtype  # consistent with itself: only the arrays disagree

    return lambda store: _edit_json(store / "zarr.json", change)


def _array_meta(layer: int, change: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda store: _edit_json(store / f"layer_{layer:02d}" / "zarr.json", change)


def _set_chunk_shape(meta: dict) -> None:
    meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 128


def _set_shape(meta: dict) -> None:
    meta["shape"][0] += 256


def _set_data_type(meta: dict) -> None:
    meta["data_type"] = "int16"


def _edit_examples(store: Path) -> None:
    table = pq.read_table(store / EXAMPLES_FILE)
    column = "label" if "label" in table.column_names else "input_hash"  # a segment holds inputs
    labels = table.column(column).to_pylist()
    labels[0] = labels[1] if labels[1] != labels[0] else labels[2]  # one value changed, still valid parquet
    table = table.set_column(table.column_names.index(column), column, pa.array(labels))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    (store / EXAMPLES_FILE).write_bytes(buffer.getvalue())


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _zero(path: Path) -> None:
    path.write_bytes(bytes(len(path.read_bytes())))


def _edit_manifest_entry(store: Path) -> None:
    def change(manifest: dict) -> None:
        manifest["files"]["layer_02/c/0/0"] = "0" * 64

    _edit_json(store / CHECKSUMS_FILE, change)


@dataclass(frozen=True)
class Corruption:
    damage: Callable[[Path], None]
    verify_says: str  # in one DAMAGED line of `unipt cache verify`
    # In the `unipt: error:` line of `unipt train`; alternatives when the damage spans two chunks, since
    # the loader reads a block's chunks concurrently and names whichever damaged one fails first.
    train_says: str | tuple[str, ...]


ROWS = "(rows 0-255)"
CORRUPTIONS = {
    "flipped byte in a chunk": Corruption(
        lambda s: _flip(_chunk(s, 1, 0)),
        f"layer_01 chunk 0 {ROWS}: checksum mismatch",
        f"layer_01 chunk 0 {ROWS}: its crc32c checksum does not match its bytes",
    ),
    "truncated chunk": Corruption(
        lambda s: _truncate(_chunk(s, 1, 1)),
        "layer_01 chunk 1 (rows 256-511): checksum mismatch",
        "layer_01 chunk 1 (rows 256-511): not the chunk written there: ",
    ),
    "deleted chunk": Corruption(
        lambda s: _chunk(s, 2, 0).unlink(),
        f"layer_02 chunk 0 {ROWS}: file is missing",
        f"layer_02 chunk 0 {ROWS}: the chunk file is missing",
    ),
    "zero-filled chunk": Corruption(
        lambda s: _zero(_chunk(s, 0, 1)),
        "layer_00 chunk 1 (rows 256-511): checksum mismatch",
        "layer_00 chunk 1 (rows 256-511): not the chunk written there: its crc32c differs",
    ),
    "two chunks swapped": Corruption(
        _swap,
        f"layer_00 chunk 0 {ROWS}: checksum mismatch",
        (
            "layer_00 chunk 0 (rows 0-255): not the chunk written there",
            "layer_00 chunk 1 (rows 256-511): not the chunk written there",
        ),
    ),
    "array zarr.json data_type edited (int16)": Corruption(
        _array_meta(0, _set_data_type),
        "layer_00/zarr.json: does not match the cache attributes: data_type int16 != float16",
        "layer_00/zarr.json does not match the cache attributes: data_type int16 != float16",
    ),
    "root attrs dtype edited (bfloat16)": Corruption(
        _root_dtype("bfloat16"),
        "layer_00/zarr.json: does not match the cache attributes: data_type float16 != uint16",
        "zarr.json differs from its checksum in checksums.json",
    ),
    "root attrs dtype edited (float32)": Corruption(
        _root_dtype("float32"),
        "zarr.json: checksum mismatch",
        "zarr.json differs from its checksum in checksums.json",
    ),
    "array shape edited": Corruption(
        _array_meta(1, _set_shape),
        "layer_01/zarr.json: does not match the cache attributes: shape",
        "layer_01/zarr.json does not match the cache attributes: shape",
    ),
    "chunk shape edited": Corruption(
        _array_meta(2, _set_chunk_shape),
        "layer_02/zarr.json: does not match the cache attributes: file shape [128, 32] != [256, 32]",
        "layer_02/zarr.json does not match the cache attributes: file shape [128, 32] != [256, 32]",
    ),
    "examples.parquet edited (one label)": Corruption(
        _edit_examples,
        "examples.parquet: checksum mismatch",
        "examples.parquet differs from its checksum in checksums.json",
    ),
    "examples.parquet truncated": Corruption(
        lambda s: _truncate(s / EXAMPLES_FILE),
        "examples.parquet: checksum mismatch",
        "examples.parquet differs from its checksum in checksums.json",
    ),
    "offsets chunk damaged": Corruption(
        lambda s: _flip(s / "offsets" / "c" / "0" / "0"),
        "offsets chunk 0 (rows 0-59): checksum mismatch",
        "offsets chunk 0 (rows 0-59): its crc32c checksum does not match its bytes",
    ),
    "checksums.json removed": Corruption(
        lambda s: (s / CHECKSUMS_FILE).unlink(),
        "checksums.json: file is missing",
        "checksums.json is missing",
    ),
    "checksums.json edited (one entry)": Corruption(
        _edit_manifest_entry,
        "checksums.json: it was edited after it was written",
        "checksums.json cannot be trusted: it was edited after it was written",
    ),
}


def _registered_runs(registry: Path) -> int:
    if not registry.exists():
        return 0
    with sqlite3.connect(registry) as db:
        return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


def _train(extracted: dict, where: Path) -> int:
    """`unipt train` from the cache root under ``where``, recording runs there."""
    cache, runs, registry = where / "cache", where / "runs", where / "registry.sqlite"
    args = ["--cache-root", str(cache), "--runs-root", str(runs), "--registry", str(registry)]
    return main(["train", str(extracted["config"]), "--set", "train.epochs=1", *args, "--no-progress"])


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corruption_is_named_by_verify_and_stops_training(kind, extracted, tmp_path, capsys):
    corruption = CORRUPTIONS[kind]
    store = _copy(extracted, tmp_path)
    corruption.damage(store)
    capsys.readouterr()

    code = main(
        ["cache", "verify", extracted["key"], "--cache-root", str(tmp_path / "cache"), "--no-progress"]
    )
    out, err = capsys.readouterr()
    damaged = [line for line in out.splitlines() if line.startswith("DAMAGED")]
    assert code == 1, out + err
    assert any(corruption.verify_says in line for line in damaged), out
    assert "files damaged" in err and "Traceback" not in err

    runs, registry = tmp_path / "runs", tmp_path / "registry.sqlite"
    code = _train(extracted, tmp_path)
    _, err = capsys.readouterr()
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("unipt: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    says = corruption.train_says if isinstance(corruption.train_says, tuple) else (corruption.train_says,)
    assert any(expected in errors[0] for expected in says), errors[0]
    assert "unipt cache verify" in errors[0], errors[0]
    assert not list(runs.glob("*/record.json")) and _registered_runs(registry) == 0


def test_following_verifys_advice_repairs_the_cache(extracted, tmp_path, capsys):
    """verify names the damaged store (the view's segment, not the view), and deleting it and extracting
    again, as it says, gives a cache that verifies and trains."""
    store = _copy(extracted, tmp_path)
    _flip(_chunk(store, 1, 0))
    capsys.readouterr()
    root = ["--cache-root", str(tmp_path / "cache"), "--no-progress"]
    assert main(["cache", "verify", extracted["key"], *root]) == 1
    advice = capsys.readouterr().err
    assert f"delete the damaged store ({store})" in advice, advice
    assert "run `unipt extract`" in advice, advice

    shutil.rmtree(store)
    assert main(["extract", str(extracted["config"]), *root]) == 0, capsys.readouterr().err
    assert "extracting" in capsys.readouterr().err  # the deleted segment's inputs were extracted again
    assert main(["cache", "verify", extracted["key"], *root]) == 0
    assert _train(extracted, tmp_path) == 0, capsys.readouterr().err


def test_the_undamaged_copy_verifies_and_trains(extracted, tmp_path, capsys):
    """The control for the table above: the same copy, undamaged, verifies and trains."""
    store = _copy(extracted, tmp_path)
    assert (
        main(["cache", "verify", extracted["key"], "--cache-root", str(tmp_path / "cache"), "--no-progress"])
        == 0
    )
    manifest = json.loads((store / CHECKSUMS_FILE).read_text())
    metadata = {"zarr.json", EXAMPLES_FILE, "offsets/zarr.json"} | {f"layer_0{i}/zarr.json" for i in range(3)}
    assert metadata <= set(manifest["files"])  # every metadata file is covered
    code = _train(extracted, tmp_path)
    assert code == 0, capsys.readouterr().err
    assert _registered_runs(tmp_path / "registry.sqlite") == 1


def test_export_of_a_damaged_cache_stops_with_one_line_and_writes_nothing(extracted, tmp_path, capsys):
    store = _copy(extracted, tmp_path)
    _flip(_chunk(store, 2, 1))
    out = tmp_path / "copy.h5"
    capsys.readouterr()
    code = main(
        [
            "cache",
            "export",
            extracted["key"],
            "--cache-root",
            str(tmp_path / "cache"),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    _, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("unipt: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "layer_02 chunk 1 (rows 256-511): its crc32c checksum does not match" in errors[0]
    assert not out.exists() and not list(tmp_path.glob(".copy.h5.*"))


# --- reads check every chunk, cheaply, without the CLI ----------------------------------------------------


def test_a_chunk_moved_into_another_position_fails_the_read_that_meets_it(tmp_path):
    root = CacheRoot(tmp_path)
    tokens, _ = build_cache(root, [5, 1, 9, 3, 7, 2, 8], {0: 4}, codec="none")
    store = tmp_path / KEY
    shutil.copy(_chunk(store, 0, 0), _chunk(store, 0, 1))  # a valid chunk, crc32c and all, in the wrong place
    reader = open_cache(root.location(KEY))
    np.testing.assert_array_equal(reader.read_example(0, 0), tokens[0][0])  # chunk 0 is fine
    with pytest.raises(UniptError, match=r"layer_00 chunk 1 \(rows 8-15\): not the chunk written there"):
        reader.read_example(2, 0)  # rows 6-14: crosses into chunk 1


def test_sharded_files_are_checked_chunk_by_chunk(tmp_path):
    root = CacheRoot(tmp_path)
    tokens, _ = build_cache(root, [5, 1, 9, 3, 7, 2, 8], {0: 4}, chunks_per_file=2)
    shard_file = _chunk(tmp_path / KEY, 0, 0)  # rows 0-15 in two chunks of 8
    _flip(shard_file, 0.1)
    reader = open_cache(root.location(KEY))
    with pytest.raises(
        UniptError, match=r"layer_00 chunk 0 \(rows 0-15\): its crc32c checksum does not match"
    ):
        reader.read_example(0, 0)
    assert [p.what for p in verify(open_cache(root.location(KEY), strict=False))] == [
        "layer_00 chunk 0 (rows 0-15)"
    ]


def test_a_missing_chunk_in_reserved_but_unused_rows_is_not_damage(tmp_path):
    """Rows a shard reserves but does not fill were never written: reads never touch them, and the reader
    does not expect their files."""
    root = CacheRoot(tmp_path)
    _, layout = build_cache(root, [5, 1, 9], {0: 4}, shard_size=2)
    reader = open_cache(root.location(KEY))
    written = {int(p.name) for p in (tmp_path / KEY / "layer_00" / "c").iterdir()}
    expected = layout.files_with_rows(layout.arrays()["layer_00"], reader.offsets)
    assert expected == written
    assert layout.total_rows(layout.layers[0]) // layout.rows_per_file > len(written)  # unused files exist


# --- format 2 caches stay readable -----------------------------------------------------------------------


def _build_format_2_cache(root: Path, lengths: list[int], width: int) -> list[np.ndarray]:
    """A store as format 2 wrote it: no crc32c codec, offsets with Zarr's default codec, data files only in
    checksums.json (no metadata, no trailers, no seal)."""
    rng = np.random.default_rng(3)
    tokens = [rng.standard_normal((n, width)).astype(np.float16) for n in lengths]
    layout = StoreLayout(
        (LayerSpec(0, width),), num_examples=len(lengths), max_length=max(lengths), shard_size=2, chunk_rows=8
    )
    store = root / KEY
    group = zarr.open_group(store=str(store), mode="w", zarr_format=3)
    array = group.create_array(
        "layer_00",
        shape=(layout.total_rows(layout.layers[0]), width),
        chunks=(layout.chunk_rows, width),
        dtype=np.float16,
        compressors=compressors("blosc-zstd", "byte", 1, 2, 1 << 20, checksum=False),
        fill_value=0,
    )
    offsets = layout.offsets(layout.layers[0], np.array(lengths))
    for shard in layout.shards():
        start, stop = offsets[shard.example_start, 0], offsets[shard.example_stop - 1, 1]
        array[start:stop] = encode_rows(
            np.concatenate(tokens[shard.example_start : shard.example_stop]), "float16"
        )[0]
    group.create_array("offsets", data=offsets, chunks=offsets.shape)
    table = example_table(len(lengths)).append_column("length", pa.array(lengths, pa.int32()))
    pq.write_table(table, store / EXAMPLES_FILE)
    files = {
        p.relative_to(store).as_posix(): digest(p.read_bytes())
        for p in store.rglob("*")
        if p.is_file() and "/c/" in p.relative_to(store).as_posix()
    }
    files[EXAMPLES_FILE] = digest((store / EXAMPLES_FILE).read_bytes())
    (store / CHECKSUMS_FILE).write_text(json.dumps({"algorithm": "sha256", "files": files}))
    group.attrs.update(
        {
            "format_version": 2, "cache_key": KEY, "complete": True, "label_names": ["a", "b"],
            "layout": layout.to_json(), "layers": [0], "hidden_sizes": {"0": width}, "grids": {},
            "dtype": "float16", "max_length": max(lengths), "num_examples": len(lengths),
            "total_tokens": sum(lengths),
        }
    )  # fmt: skip
    return tokens


def test_format_2_caches_stay_readable_with_verify_as_their_check(tmp_path, capsys):
    tokens = _build_format_2_cache(tmp_path, [5, 1, 9, 3, 7], 6)
    reader = open_cache(CacheRoot(tmp_path).location(KEY))
    assert reader.format_version == 2 and not reader.checked
    for i, want in enumerate(tokens):
        np.testing.assert_array_equal(reader.read_example(i, 0), want)
    assert main(["cache", "verify", KEY, "--cache-root", str(tmp_path), "--no-progress"]) == 0
    _flip(_chunk(tmp_path / KEY, 0, 3))
    assert main(["cache", "verify", KEY, "--cache-root", str(tmp_path), "--no-progress"]) == 1
    assert "layer_00 chunk 3 (rows 24-31): checksum mismatch" in capsys.readouterr().out


# --- lies that are resealed: sizes bounded, tampering caught by the registry's root digests -----------------


def _reseal(store: Path) -> None:
    """Recompute a store's checksums.json as its writer would (every listed file's sha256 and chunk
    trailers, then the seal): what someone who edits a cache on purpose does, so plain verify passes."""
    manifest = json.loads((store / CHECKSUMS_FILE).read_text())
    files = {key: digest((store / key).read_bytes()) for key in manifest["files"]}
    trailers = {
        key: trailers_of(np.frombuffer((store / key).read_bytes(), np.uint8), 1)
        for key in manifest["trailers"]
    }
    (store / CHECKSUMS_FILE).write_text(json.dumps(seal(files, trailers)))


def _reseal_all(root: Path, key: str, segment: Path) -> None:
    """Reseal ``segment``, point the view ``key`` at its new checksums.json, and reseal the view."""
    _reseal(segment)
    view = root / key

    def repoint(meta: dict) -> None:
        for entry in meta["attributes"]["segments"]:
            entry["checksums"] = digest((segment / CHECKSUMS_FILE).read_bytes())

    _edit_json(view / "zarr.json", repoint)
    _reseal(view)


def _set_num_examples(count: int) -> Callable[[dict], None]:
    def change(meta: dict) -> None:
        meta["attributes"]["num_examples"] = count
        meta["attributes"]["layout"]["num_examples"] = count

    return change


def _bounded_cli(*args: str) -> subprocess.CompletedProcess:
    """`unipt ARGS` in a child capped at 3 GiB of address space and 300 s: a size that is trusted and
    allocated fails this test instead of taking the machine (or hanging the suite)."""
    cap = 3 * 2**30
    return subprocess.run(
        [sys.executable, "-m", "unipt.pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)),
    )


@pytest.mark.parametrize(
    ("store", "count"),
    [("segment", 10**12), ("view", 10**12), ("segment", 10**6), ("view", 10**6)],
)
def test_a_resealed_num_examples_is_refused_before_anything_is_sized(extracted, tmp_path, store, count):
    segment = _copy(extracted, tmp_path)
    root, key = tmp_path / "cache", extracted["key"]
    target = segment if store == "segment" else root / key
    _edit_json(target / "zarr.json", _set_num_examples(count))
    _reseal_all(root, key, segment)
    common = ["--cache-root", str(root)]

    verified = _bounded_cli("cache", "verify", key, *common, "--no-progress")
    assert "Traceback" not in verified.stderr and "MemoryError" not in verified.stderr, verified.stderr
    if verified.returncode == 1:  # opened: the lie is a reported problem
        assert "DAMAGED" in verified.stdout, verified.stdout
    else:  # refused at open: one line naming the attribute
        errors = [line for line in verified.stderr.splitlines() if line.startswith("unipt: error:")]
        assert verified.returncode == 2 and len(errors) == 1, verified.stderr
    runs = ["--runs-root", str(tmp_path / "runs"), "--registry", str(tmp_path / "registry.sqlite")]
    trained = _bounded_cli("train", str(extracted["config"]), *common, *runs, "--no-progress")
    errors = [line for line in trained.stderr.splitlines() if line.startswith("unipt: error:")]
    assert trained.returncode == 2 and len(errors) == 1 and "Traceback" not in trained.stderr, trained.stderr
    assert "examples.parquet" in errors[0] or "num_examples" in errors[0], errors[0]
    assert not list((tmp_path / "runs").glob("*/record.json"))


def test_layouts_past_sane_limits_are_refused_by_name():
    good = StoreLayout(layers=(LayerSpec(0, 32),), num_examples=60, max_length=16)
    assert good.total_rows(good.layers[0]) > 0 and good.limit_problem() is None
    for change, says in [
        ({"num_examples": 10**12}, "num_examples is 1000000000000"),
        ({"num_examples": 1e6}, "num_examples is 1000000.0"),
        ({"num_examples": 10**8, "shard_size": 1}, "shards"),
        ({"layers": [{"index": 0, "width": 2**31}]}, "width"),
        ({"max_length": -5}, "max_length"),
        ({"chunk_rows": True}, "chunk_rows"),
        ({"layers": [{"index": 0, "width": 8, "grid": [2**12, 2**12]}]}, "grid"),
    ]:
        with pytest.raises(UniptError, match=says):
            StoreLayout.from_json({**good.to_json(), **change})


def _swap_layers(segment: Path) -> None:
    """layer_00 and layer_01 trade places: same widths, so the store stays self-consistent."""
    (segment / "layer_00").rename(segment / "swap")
    (segment / "layer_01").rename(segment / "layer_00")
    (segment / "swap").rename(segment / "layer_01")


def _negate_chunk(segment: Path) -> None:
    array = zarr.open_array(str(segment / "layer_02"), mode="r+")
    array[0:256] = -array[0:256]  # written through Zarr: valid chunks with their own crc32c


def _flip_labels(root: Path, key: str) -> None:
    table = pq.read_table(root / key / EXAMPLES_FILE)
    labels = pa.array(1 - table.column("label").to_numpy(), table.schema.field("label").type)
    pq.write_table(
        table.set_column(table.schema.get_field_index("label"), "label", labels), root / key / EXAMPLES_FILE
    )


TAMPERING = {
    "two layer arrays swapped": lambda root, key, segment: _swap_layers(segment),
    "a chunk negated": lambda root, key, segment: _negate_chunk(segment),
    "the view's labels flipped": lambda root, key, segment: _flip_labels(root, key),
}


def _train_once(extracted: dict, where: Path) -> dict:
    """The extracted cache copied to ``where`` and trained on once: a registered run that recorded the
    cache's root digest (and whose stored config reads this copy, so a rerun reads it too)."""
    shutil.copytree(extracted["root"], where / "cache", ignore=shutil.ignore_patterns(".partial", ".leases"))
    assert _train(extracted, where) == 0
    (record,) = (where / "runs").glob("*/record.json")
    return {"where": where, "record": json.loads(record.read_text())}


@pytest.fixture
def trained_once(extracted, tmp_path) -> dict:
    return _train_once(extracted, tmp_path / "w")


def test_a_run_records_and_registers_the_root_digest_of_its_cache(extracted, trained_once):
    record = trained_once["record"]
    with open_cache(CacheRoot(trained_once["where"] / "cache").location(extracted["key"])) as view:
        assert record["cache"]["root_digest"] == view.root_digest() == stored_root_digest(view.location)
        (backbone,) = record["backbones"].values()
        assert backbone["root_digest"] == view.root_digest()
    with Registry(trained_once["where"] / "registry.sqlite", create=False) as registry:
        assert registry.cache_digests(extracted["key"]) == {view.root_digest(): [record["run_id"]]}


@pytest.mark.parametrize("kind", list(TAMPERING))
def test_resealed_tampering_passes_verify_but_not_the_registry(
    kind, extracted, trained_once, tmp_path, capsys
):
    where = trained_once["where"]
    root, key = where / "cache", extracted["key"]
    (segment,) = (root / "spaces").glob("*/segments/*")
    TAMPERING[kind](root, key, segment)
    _reseal_all(root, key, segment)
    registry = str(where / "registry.sqlite")
    common = ["--cache-root", str(root), "--no-progress"]
    capsys.readouterr()

    assert main(["cache", "verify", key, *common]) == 0, capsys.readouterr()  # the manifests agree
    capsys.readouterr()
    assert main(["cache", "verify", key, *common, "--against-registry", "--registry", registry]) == 1
    out, err = capsys.readouterr()
    assert "DAMAGED root digest" in out and trained_once["record"]["run_id"] in out, out
    assert "changed after the runs" in err, err

    def refused(args: list[str], says: str) -> None:
        code = main(args)
        _, err = capsys.readouterr()
        errors = [line for line in err.splitlines() if line.startswith("unipt: error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
        assert says in errors[0], errors[0]

    runs = ["--runs-root", str(where / "runs"), "--registry", registry]
    # The cache alone (no CONFIG, so no dataset to compare labels with): the registry refuses it.
    refused(["train", "--cache", str(root / key), *runs, "--no-progress"], "not the cache registered runs")
    # By key through the config: the labels against the data, then the registry.
    says = "disagrees with dataset" if "labels" in kind else "not the cache registered runs"
    refused(["train", str(extracted["config"]), *common, *runs], says)
    # A rerun of the registered run reads the cache by key from the stored config's cache root.
    refused(["rerun", trained_once["record"]["run_id"], "--registry", registry, "--no-progress"], says)
    with Registry(registry, create=False) as runs_after:
        assert len(runs_after.list()) == 1  # nothing trained on the changed cache was registered


def test_an_unchanged_cache_verifies_against_the_registry(extracted, trained_once, tmp_path, capsys):
    registry = str(trained_once["where"] / "registry.sqlite")
    args = ["--cache-root", str(trained_once["where"] / "cache"), "--no-progress", "--registry", registry]
    assert main(["cache", "verify", extracted["key"], *args, "--against-registry"]) == 0
    assert "ok: cache" in capsys.readouterr().out
    missing = [*args[:-1], str(tmp_path / "nope.sqlite")]
    assert main(["cache", "verify", extracted["key"], *missing, "--against-registry"]) == 2
    assert "no run registry at" in capsys.readouterr().err


def test_train_refuses_a_view_whose_labels_differ_from_the_data(extracted, tmp_path, capsys):
    """No registry here at all: the comparison with the dataset table alone refuses the relabelled view."""
    segment = _copy(extracted, tmp_path)
    _flip_labels(tmp_path / "cache", extracted["key"])
    _reseal_all(tmp_path / "cache", extracted["key"], segment)
    capsys.readouterr()
    assert _train(extracted, tmp_path) == 2
    err = capsys.readouterr().err
    assert "disagrees with dataset" in err and "on the label of example 0" in err, err
    assert not (tmp_path / "registry.sqlite").exists() or _registered_runs(tmp_path / "registry.sqlite") == 0


def test_a_view_without_its_segments_digest_is_refused(extracted, tmp_path, capsys):
    """Dropping the per-segment `checksums` field must not switch the segment check off."""
    segment = _copy(extracted, tmp_path)
    root, key = tmp_path / "cache", extracted["key"]
    _zero(_chunk(segment, 0, 0))

    def drop(meta: dict) -> None:
        for entry in meta["attributes"]["segments"]:
            entry.pop("checksums")

    _reseal(segment)
    _edit_json(root / key / "zarr.json", drop)
    _reseal(root / key)
    capsys.readouterr()
    assert main(["cache", "verify", key, "--cache-root", str(root), "--no-progress"]) == 1
    assert "without the digest of its checksums.json" in capsys.readouterr().out
    assert _train(extracted, tmp_path) == 2
    assert "without the digest of its checksums.json" in capsys.readouterr().err


def test_a_resealed_label_past_the_class_names_is_refused(extracted, tmp_path, capsys):
    """From the cache alone (nothing to compare the labels with), a label no class name has is one line,
    not an index past the head."""
    segment = _copy(extracted, tmp_path)
    root, key = tmp_path / "cache", extracted["key"]
    table = pq.read_table(root / key / EXAMPLES_FILE)
    labels = table.column("label").to_numpy().copy()
    labels[5] = 10**9
    column = pa.array(labels, table.schema.field("label").type)
    pq.write_table(
        table.set_column(table.schema.get_field_index("label"), "label", column), root / key / EXAMPLES_FILE
    )
    _reseal_all(root, key, segment)
    capsys.readouterr()
    runs = ["--runs-root", str(tmp_path / "runs"), "--registry", str(tmp_path / "registry.sqlite")]
    assert main(["train", "--cache", str(root / key), *runs, "--no-progress"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("unipt: error:")]
    assert len(errors) == 1 and "labels outside its 2 class names" in errors[0] and "Traceback" not in err, (
        err
    )
