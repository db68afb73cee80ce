"""`unipt cache ls / info / verify / gc`: what users run to look after their caches."""

from __future__ import annotations

import json

from pipeline import FORMAT_VERSION
from pipeline.cache import CacheRoot
from pipeline.cli import main
from pipeline.runs import write_run_record
from tests.conftest import KEY, build_cache

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
    assert out.count("\n") == 1 and out.startswith(KEY) and "int8" in out and f"{len(LENGTHS):>7} ex" in out
    assert OTHER in err and "unfinished" in err

    code, out, _ = _cli(capsys, "cache", "info", KEY, "--cache-root", str(tmp_path))
    info = json.loads(out)
    assert info["key"] == KEY and info["layers"] == [0, 2] and info["hidden_sizes"] == {"0": 4, "2": 6}
    assert info["dtype"] == "int8" and info["examples"] == len(LENGTHS)
    assert info["total_tokens"] == sum(LENGTHS) and info["format_version"] == FORMAT_VERSION
    assert info["bytes_on_disk"] > 0 and info["codec"]["chunk_rows"] == 8


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

    args = ["cache", "gc", "--cache-root", str(caches), "--runs-root", str(runs)]
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
    code, _, err = _cli(capsys, "cache", "gc", "--cache-root", str(caches), "--runs-root", str(runs), "--yes")
    assert code == 2 and "run record" in err and "unreadable" in err
    assert CacheRoot(caches).keys() == [KEY]
    # The broken record was this test's own doing: the suite's strict-JSON check of records skips it.
    (runs / "broken" / "record.json").unlink()
