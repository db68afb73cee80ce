"""`unipt cache ls / info / verify / gc`: what users run to look after their caches."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.conftest import KEY, build_cache
from unipt.pipeline import FORMAT_VERSION
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cli.app import main
from unipt.pipeline.log import human_bytes
from unipt.pipeline.runs.records import write_run_record

OTHER = "cd" * 16
LENGTHS = [5, 1, 9, 3, 7, 2, 8, 4]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_passes_then_names_the_damaged_chunk(tmp_path, capsys):
    root = CacheRoot(tmp_path)
    build_cache(root, LENGTHS, {0: 4, 2: 6}, shard_size=4, chunk_rows=8)
    code, out, _ = _cli(capsys, "cache", "verify", KEY, "--cache-root", str(tmp_path), "--no-progress")
    assert code == 0 and "ok:" in out

    chunk = tmp_path / KEY / "layer_02" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    chunk.write_bytes(bytes(data))
    truncated = tmp_path / KEY / "layer_00" / "c" / "0" / "0"
    truncated.write_bytes(truncated.read_bytes()[:10])
    code, out, err = _cli(capsys, "cache", "verify", str(tmp_path / KEY), "--no-progress")
    assert code == 1
    damaged = [line for line in out.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 2
    assert any("layer_02 chunk 1 (rows 8-15): checksum mismatch" in line for line in damaged)
    assert any("layer_00 chunk 0 (rows 0-7): checksum mismatch" in line for line in damaged)
    assert "2 of" in err and "re-extract" in err

    (tmp_path / KEY / "examples.parquet").unlink()
    code, out, _ = _cli(capsys, "cache", "verify", KEY, "--cache-root", str(tmp_path), "--no-progress")
    assert code == 1 and "examples.parquet: file is missing" in out


def test_verify_covers_sharded_files(tmp_path, capsys):
    root = CacheRoot(tmp_path)
    _, layout = build_cache(root, LENGTHS, {0: 4}, shard_size=4, chunk_rows=8, chunks_per_file=4)
    base, _ = layout.row_span(layout.shards()[1], layout.layers[0])
    index = base // 32  # 4 chunks of 8 rows per file: the second extraction shard's first file
    shard_file = tmp_path / KEY / "layer_00" / "c" / str(index) / "0"
    data = bytearray(shard_file.read_bytes())
    data[5] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    code, out, _ = _cli(capsys, "cache", "verify", KEY, "--cache-root", str(tmp_path), "--no-progress")
    assert code == 1 and f"layer_00 chunk {index} (rows {base}-{base + 31}): checksum mismatch" in out


def test_ls_and_info_describe_the_cache(tmp_path, capsys):
    root = CacheRoot(tmp_path)
    build_cache(root, LENGTHS, {0: 4, 2: 6}, dtype="int8")
    build_cache(root, LENGTHS[:3], {0: 4}, key=OTHER, commit=False)
    code, out, err = _cli(capsys, "cache", "ls", "--cache-root", str(tmp_path))
    assert code == 0
    header, row, note = out.splitlines()
    assert header.split()[:6] == ["key", "backbone", "dtype", "examples", "tokens", "reads"]
    assert (
        row.startswith(KEY) and row.split()[2:4] == ["int8", str(len(LENGTHS))] and note.startswith("(reads:")
    )
    assert OTHER in err and "unfinished" in err

    code, out, _ = _cli(capsys, "cache", "info", KEY, "--cache-root", str(tmp_path))
    info = json.loads(out)
    assert info["key"] == KEY and info["layers"] == [0, 2] and info["hidden_sizes"] == {"0": 4, "2": 6}
    assert info["dtype"] == "int8" and info["examples"] == len(LENGTHS)
    assert info["total_tokens"] == sum(LENGTHS) and info["format_version"] == FORMAT_VERSION
    assert info["codec"]["chunk_rows"] == 8
    files = [path for path in (tmp_path / KEY).rglob("*") if path.is_file()]
    assert info["bytes_on_disk"] == sum(path.stat().st_size for path in files)  # every file of the store


def test_info_on_a_missing_cache_is_one_clear_line(tmp_path, capsys):
    code, _, err = _cli(capsys, "cache", "info", "ef" * 16, "--cache-root", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "no activation cache" in err


def _record(runs: str, key: str, run_id: str) -> None:
    write_run_record(runs, {"run_id": run_id, "config": {"name": "t"}, "cache": {"key": key}})


def test_gc_is_a_dry_run_until_told_and_keeps_referenced_caches(tmp_path, capsys):
    caches, runs = tmp_path / "cache", tmp_path / "runs"
    root = CacheRoot(caches)
    build_cache(root, LENGTHS, {0: 4})
    build_cache(root, LENGTHS, {0: 4}, key=OTHER)
    unfinished = "ef" * 16
    build_cache(root, LENGTHS, {0: 4}, key=unfinished, commit=False)
    _record(str(runs), KEY, "run-1")

    args = ["cache", "gc", "--cache-root", str(caches), "--runs-root", str(runs), "--no-registry"]
    code, out, _ = _cli(capsys, *args)
    assert code == 0 and f"would remove {OTHER}" in out and "add --yes" in out
    assert KEY not in out and unfinished not in out
    assert sorted(root.keys()) == sorted([KEY, OTHER])  # nothing removed

    code, out, _ = _cli(capsys, *args, "--yes")
    assert code == 0 and f"removing {OTHER}" in out
    assert root.keys() == [KEY] and root.partial_keys() == [unfinished]
    assert not (caches / ".trash").exists() or not any((caches / ".trash").iterdir())

    code, out, _ = _cli(capsys, *args, "--yes", "--include-partial")
    assert f"removing {unfinished} (unfinished)" in out
    assert root.keys() == [KEY] and root.partial_keys() == []


def test_gc_refuses_to_guess_when_a_run_record_is_unreadable(tmp_path, capsys):
    caches, runs = tmp_path / "cache", tmp_path / "runs"
    build_cache(CacheRoot(caches), LENGTHS, {0: 4})
    (runs / "broken").mkdir(parents=True)
    (runs / "broken" / "record.json").write_text("{not json")
    code, _, err = _cli(
        capsys, "cache", "gc", "--cache-root", str(caches), "--runs-root", str(runs), "--no-registry", "--yes"
    )
    assert code == 2 and "run record" in err and "unreadable" in err
    assert CacheRoot(caches).keys() == [KEY]
    # The broken record was this test's own doing: the suite's strict-JSON check of records skips it.
    (runs / "broken" / "record.json").unlink()


def test_gc_refuses_when_the_runs_root_or_registry_it_would_consult_does_not_exist(tmp_path, capsys):
    caches, runs, registry = tmp_path / "cache", tmp_path / "runs", tmp_path / "registry.sqlite"
    build_cache(CacheRoot(caches), LENGTHS, {0: 4})
    _record(str(runs), KEY, "run-1")  # the runs root exists, the registry (a typo, say) does not
    args = ["cache", "gc", "--yes", "--cache-root", str(caches), "--runs-root", str(runs)]
    code, out, err = _cli(capsys, *args, "--registry", str(tmp_path / "registy.sqlite"))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert str(runs) in err and str(tmp_path / "registy.sqlite") in err and "--no-registry" in err
    # Run from another folder: the relative default runs root is not there either.
    code, _, err = _cli(capsys, *args[:-2], "--runs-root", "no/such/runs", "--registry", str(registry))
    assert code == 2 and "no/such/runs and " in err and str(registry) in err
    assert CacheRoot(caches).keys() == [KEY]
    # Said on purpose: the existing runs root is still honoured, so the referenced cache stays.
    code, out, _ = _cli(capsys, *args, "--registry", str(registry), "--no-registry")
    assert code == 0 and "removed 0 cache(s)" in out and CacheRoot(caches).keys() == [KEY]
    code, out, _ = _cli(capsys, *args[:-2], "--runs-root", str(tmp_path / "none"), "--no-registry")
    assert code == 0 and f"removing {KEY}" in out and CacheRoot(caches).keys() == []


def test_gc_removes_what_an_interrupted_gc_left_in_the_trash_and_ls_shows_it(tmp_path, capsys):
    caches = tmp_path / "cache"
    root = CacheRoot(caches)
    build_cache(root, LENGTHS, {0: 4}, key=OTHER)
    # A gc killed between its move into .trash and the delete leaves the store there, under no key.
    trash = caches / ".trash" / f"{OTHER}-0badf00d"
    trash.parent.mkdir()
    (caches / OTHER).rename(trash)
    size = sum(p.stat().st_size for p in trash.rglob("*") if p.is_file())
    code, _, err = _cli(capsys, "cache", "ls", "--cache-root", str(caches))
    assert code == 0 and f"1 leftover(s) in {caches / '.trash'}, {human_bytes(size)}" in err

    args = ["cache", "gc", "--cache-root", str(caches), "--runs-root", str(tmp_path / "r"), "--no-registry"]
    code, out, _ = _cli(capsys, *args)
    assert code == 0 and "would remove 1 leftover(s)" in out and "add --yes" in out and trash.is_dir()
    code, out, _ = _cli(capsys, *args, "--yes")
    assert code == 0 and "removing 1 leftover(s)" in out and human_bytes(size) in out
    assert not trash.exists() and not any((caches / ".trash").iterdir())
    code, _, err = _cli(capsys, "cache", "ls", "--cache-root", str(caches))
    assert "leftover" not in err


def _space_with_a_view(root: CacheRoot) -> str:
    """Two segments of an activation space and a view over both; returns the view's key."""
    from tests.test_incremental import views_over_two_segments

    views_over_two_segments(root, ["ee" * 16])
    return "ee" * 16


def _flip_labels(view: Path) -> None:
    table = pq.read_table(view / "examples.parquet")
    flipped = pc.subtract(pa.scalar(1, table.schema.field("label").type), table.column("label"))
    pq.write_table(
        table.set_column(table.schema.get_field_index("label"), "label", flipped), view / "examples.parquet"
    )


def _swap_label_names(view: Path) -> None:
    meta = json.loads((view / "zarr.json").read_text())
    meta["attributes"]["label_names"] = meta["attributes"]["label_names"][::-1]
    (view / "zarr.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


@pytest.mark.parametrize("tamper", [_flip_labels, _swap_label_names])
def test_compact_refuses_a_space_that_verify_finds_damaged_and_launders_nothing(tmp_path, capsys, tamper):
    from tests.test_incremental import SPACE

    root = CacheRoot(tmp_path)
    key = _space_with_a_view(root)
    tamper(tmp_path / key)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    verify = ["cache", "verify", key, "--cache-root", str(tmp_path), "--no-progress"]
    assert _cli(capsys, *verify)[0] == 1
    code, out, err = _cli(capsys, "cache", "compact", SPACE, "--cache-root", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and f"cannot compact space {SPACE}" in err, err
    assert str(tmp_path / key) in err and "unipt cache verify" in err
    assert root.segments(SPACE) == ["01" * 16, "02" * 16]  # nothing merged, nothing resealed
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    assert _cli(capsys, *verify)[0] == 1  # still found


def test_compact_refuses_a_damaged_segment_chunk(tmp_path, capsys):
    from tests.test_incremental import SPACE

    root = CacheRoot(tmp_path)
    _space_with_a_view(root)
    layer = Path(root.segment_location(SPACE, "02" * 16).url) / "layer_00"
    chunk = next(p for p in sorted(layer.rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    code, _, err = _cli(capsys, "cache", "compact", SPACE, "--cache-root", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "02" * 16 in err and "is damaged" in err
    assert root.segments(SPACE) == ["01" * 16, "02" * 16]
