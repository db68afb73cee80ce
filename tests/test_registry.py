"""The run registry: every run lands in SQLite; `unipt runs ls|show|diff` read it; gc respects it."""

from __future__ import annotations

import json
import shutil
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from pipeline.cache import CacheRoot
from pipeline.cli import main
from pipeline.errors import UniptError
from pipeline.registry import _SCHEMA, SCHEMA_VERSION, Registry
from pipeline.runs import write_run_record
from tests.conftest import KEY, build_cache

FAST = ["--set", "train.epochs=2", "--no-progress"]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _record(run_id: str, key: str = KEY, **extra) -> dict:
    return {
        "run_id": run_id,
        "created_at": "2026-01-01T00:00:00Z",
        "config": {"name": "t", "train": {"lr": 0.001}},
        "seed": 0,
        "dataset": {"source": "data.csv", "fingerprint": "f" * 64},
        "cache": {"key": key, "key_fields": {"dtype": "float16"}},
        "metrics": {"val_acc": 0.5, "test_acc": float("nan"), "best_epoch": 1},
        "versions": {"python": "3"},
        "project_commit": None,
        **extra,
    }


def test_register_get_list_and_schema(tmp_path):
    path = tmp_path / "deep" / "registry.sqlite"
    with Registry(path) as registry:
        registry.register(_record("20260101-000000-aaaa"), {"run_dir": "/runs/a"})
        registry.register(
            _record("20260101-000001-bbbb", key="cd" * 16, backbones={"image": {"cache_key": "ef" * 16}})
        )
        registry.register(_record("20260101-000002-bbbc", rerun_of="20260101-000000-aaaa"))
        with pytest.raises(UniptError, match="already in the registry"):
            registry.register(_record("20260101-000000-aaaa"))

        entry = registry.get("20260101-000000")  # a unique prefix
        assert entry.run_id == "20260101-000000-aaaa" and entry.artifacts == {"run_dir": "/runs/a"}
        assert entry.config == {"name": "t", "train": {"lr": 0.001}} and entry.seed == 0
        assert entry.metrics["val_acc"] == 0.5 and entry.metrics["test_acc"] != entry.metrics["test_acc"]
        assert entry.cache_keys == {"cache": KEY} and entry.cache_key_fields == {"dtype": "float16"}
        assert registry.get("20260101-000001-bbbb").cache_keys == {
            "cache": "cd" * 16,
            "backbone:image": "ef" * 16,
        }
        assert registry.get("20260101-000002").rerun_of == "20260101-000000-aaaa"
        with pytest.raises(UniptError, match="ambiguous"):
            registry.get("20260101-00000")
        with pytest.raises(UniptError, match="no run 'nope'"):
            registry.get("nope")
        assert [e.run_id[-4:] for e in registry.list()] == ["aaaa", "bbbb", "bbbc"]
        assert [e.run_id[-4:] for e in registry.list(limit=2)] == ["bbbb", "bbbc"]
        assert registry.cache_keys() == {KEY, "cd" * 16, "ef" * 16}

    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(UniptError, match="newer than this unipt"):
        Registry(path)


def _register_many(path: str, worker: int, count: int) -> int:
    with Registry(path) as registry:
        for i in range(count):
            registry.register(_record(f"w{worker}-{i:03d}"))
    return count


def test_parallel_processes_register_without_losing_runs(tmp_path):
    path = str(tmp_path / "registry.sqlite")
    with ProcessPoolExecutor(max_workers=4) as pool:
        done = list(pool.map(_register_many, [path] * 4, range(4), [25] * 4))
    assert sum(done) == 100
    with Registry(path) as registry:
        assert len(registry.list()) == 100


def test_runs_ls_show_diff_after_real_runs(tiny_config, tmp_path, capsys, ray_session):
    registry = str(tmp_path / "registry.sqlite")
    code, out, _ = _cli(capsys, "runs", "ls", "--registry", registry)
    assert code == 0 and out == ""

    assert _cli(capsys, "run", str(tiny_config), *FAST)[0] == 0
    (first,) = (p.name for p in (tmp_path / "runs").iterdir())
    assert _cli(capsys, "train", str(tiny_config), *FAST, "--set", "train.lr=0.003")[0] == 0
    # Run ids start with the second they were made in, so two quick runs need not sort in run order.
    (second,) = (p.name for p in (tmp_path / "runs").iterdir() if p.name != first)

    code, out, _ = _cli(capsys, "runs", "ls", "--registry", registry)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("run_id") and len(lines) == 3
    assert lines[1].startswith(first) and lines[2].startswith(second)

    code, out, _ = _cli(capsys, "runs", "show", first, "--registry", registry)
    shown = json.loads(out)
    record = json.loads((tmp_path / "runs" / first / "record.json").read_text())
    assert shown["run_id"] == first and shown["config"] == record["config"]
    assert shown["metrics"] == record["metrics"] and shown["seed"] == 0
    assert shown["dataset_fingerprint"] == record["dataset"]["fingerprint"]
    assert shown["cache_keys"]["cache"] == record["cache"]["key"]
    assert shown["versions"]["torch"] == record["versions"]["torch"]
    assert shown["project_commit"] == record["project_commit"]
    assert Path(shown["artifacts"]["record"]).is_file() and Path(shown["artifacts"]["config"]).is_file()
    # The device the run actually had (pipeline.experiment records str(pick_device("auto"))).
    assert shown["runtime"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert shown["runtime"]["torch_threads"] >= 1
    assert shown["created_at"] and shown["registered_at"]

    code, out, _ = _cli(capsys, "runs", "diff", first, second, "--registry", registry)
    assert code == 0
    config_part = out.split("config:")[1].split("metrics")[0]
    assert "train.lr  0.01 -> 0.003" in config_part
    assert config_part.count("->") == 1  # nothing else in the config differs
    assert "val_acc" in out.split("metrics:")[1] or "metrics: same" in out
    assert "dataset_fingerprint" not in out  # same data, same cache

    code, out, _ = _cli(capsys, "runs", "diff", first, first, "--registry", registry)
    assert "config: same" in out and "metrics: same" in out and "identity: same" in out


def test_gc_keeps_caches_the_registry_references(tmp_path, capsys):
    caches, runs, registry = tmp_path / "cache", tmp_path / "runs", tmp_path / "registry.sqlite"
    other = "cd" * 16
    build_cache(CacheRoot(caches), [3, 4, 5], {0: 4})
    build_cache(CacheRoot(caches), [3, 4, 5], {0: 4}, key=other)
    record = _record("run-1")
    run_dir = write_run_record(runs, record)
    with Registry(registry) as reg:
        reg.register(record, {"run_dir": str(run_dir)})
    shutil.rmtree(run_dir)  # the record is gone; the registry still knows the run

    args = ["cache", "gc", "--cache-root", str(caches), "--runs-root", str(runs), "--registry", str(registry)]
    code, out, _ = _cli(capsys, *args, "--yes")
    assert code == 0 and f"removing {other}" in out and KEY not in out
    assert CacheRoot(caches).keys() == [KEY]


def test_missing_registry_is_one_clear_line(tmp_path, capsys):
    code, _, err = _cli(capsys, "runs", "show", "abc", "--registry", str(tmp_path / "none.sqlite"))
    assert code == 2 and err.count("\n") == 1 and "no run registry" in err


def test_a_schema_1_registry_gains_root_digests_and_keeps_its_runs(tmp_path):
    """Registries written before root digests (schema 1) are migrated in place: their runs stay, with no
    digest (so nothing is compared for them), and new runs record theirs."""
    path = tmp_path / "registry.sqlite"
    db = sqlite3.connect(path)
    old_schema = _SCHEMA.replace("    root_digest TEXT,\n", "")
    assert old_schema != _SCHEMA
    db.executescript(old_schema)
    db.execute(
        "INSERT INTO runs (run_id, created_at, registered_at, config_json, config_sha256, "
        "cache_key_fields_json, metrics_json, versions_json, artifacts_json, runtime_json) "
        "VALUES ('old', 't', 't', '{}', 'x', '{}', '{}', '{}', '{}', '{}')"
    )
    db.execute("INSERT INTO run_caches (run_id, cache_key, role) VALUES ('old', ?, 'cache')", (KEY,))
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with Registry(path) as registry:
        assert registry.get("old").cache_keys == {"cache": KEY}
        assert registry.cache_digests(KEY) == {}
        record = _record("new")
        record["cache"]["root_digest"] = "d" * 64
        registry.register(record)
        assert registry.cache_digests(KEY) == {"d" * 64: ["new"]}
        assert registry.replace_cache_digest(KEY, "d" * 64, "e" * 64) == 1
        assert registry.cache_digests(KEY) == {"e" * 64: ["new"]}
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
