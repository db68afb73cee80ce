"""The run registry: every run lands in SQLite; `unipt runs ls|show|diff` read it; gc respects it."""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.conftest import KEY, build_cache
from unipt.pipeline import experiment
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cli.app import main
from unipt.pipeline.config import load_config
from unipt.pipeline.errors import UniptError
from unipt.pipeline.runs.records import run_record, write_run_record
from unipt.pipeline.runs.registration import ready_registry, registry_id
from unipt.pipeline.runs.registry import _SCHEMA, SCHEMA_VERSION, Registry, failure

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


@pytest.mark.e2e
def test_runs_ls_show_diff_after_real_runs(shared_extraction, tmp_path, capsys):
    config = shared_extraction.config_in(tmp_path)  # reads the shared cache; runs and registry here
    registry = str(tmp_path / "registry.sqlite")
    code, out, _ = _cli(capsys, "runs", "ls", "--registry", registry)
    assert code == 0 and out == ""

    assert _cli(capsys, "run", str(config), *FAST)[0] == 0
    (first,) = (p.name for p in (tmp_path / "runs").iterdir())
    assert _cli(capsys, "train", str(config), *FAST, "--set", "train.lr=0.003")[0] == 0
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
    # The device the run actually had (unipt.pipeline.experiment.training records str(pick_device("auto"))).
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


def test_the_run_record_is_built_from_what_was_prepared_and_trained(tiny_config):
    prep = experiment.prepare(load_config(tiny_config))
    trained = experiment.Trained(
        task="classification",
        metrics={"test_acc": 0.5, "val_f1": math.nan},
        history=[{"epoch": 1, "train_loss": 0.7}],
        layer_weights=[0.25, 0.75],
        layer_names=[],
        cache_source="/caches/one",
        cache_bytes=123,
        root_digests={prep.primary.name: "d" * 64},
    )
    timings = {"extract_s": 2.0, "train_s": 1.0, "total_s": 3.0}
    doc = run_record("run-1", prep.config, prep.dataset, prep.backbones, trained, True, timings, "/r.sqlite")
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc  # strict JSON: the NaN is null, and why
    assert doc["metrics"] == {"test_acc": 0.5, "val_f1": None} and "metrics.val_f1" in doc["undefined"]
    assert doc["run_id"] == "run-1" and doc["config"] == prep.config.model_dump(mode="json")
    assert doc["dataset"]["fingerprint"] == prep.dataset.fingerprint
    assert doc["dataset"]["num_examples"] == len(prep.dataset) and doc["dataset"]["splits"]["train"] > 0
    assert doc["cache"] == {
        "key": prep.key,
        "key_fields": prep.key_fields,
        "path": "/caches/one",
        "hit": True,
        "bytes_on_disk": 123,
        "root_digest": "d" * 64,
    }
    name_or_path = prep.primary.config.name_or_path
    assert doc["backbones"] == {
        prep.primary.name: {"name_or_path": name_or_path, "cache_key": prep.key, "root_digest": "d" * 64}
    }
    assert doc["task"] == {"name": "classification", "headline": trained.headline, "select_metric": None}
    assert doc["timings"] == timings and doc["registry"] == "/r.sqlite"
    assert "report" not in doc and "warnings" not in doc and "gallery_layer_weights" not in doc


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


def _unregister(registry: Path, run_id: str) -> None:
    """What a kill -9 between record.json and registration leaves: the record, no registry row."""
    db = sqlite3.connect(registry)
    with db:
        db.execute("DELETE FROM run_caches WHERE run_id = ?", (run_id,))
        db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
    db.close()


def _registered(registry: Path) -> set[str]:
    with Registry(registry) as reg:
        return reg.run_ids()


@pytest.mark.e2e
def test_a_run_stopped_before_registration_is_registered_later(shared_extraction, tmp_path, capsys):
    config = shared_extraction.config_in(tmp_path)  # reads the shared cache; runs and registry here
    registry, runs = tmp_path / "registry.sqlite", tmp_path / "runs"
    assert _cli(capsys, "run", str(config), *FAST)[0] == 0
    (run_dir,) = runs.iterdir()
    run_id = run_dir.name
    with Registry(registry) as reg:
        artifacts = reg.get(run_id).artifacts
    assert "model" in artifacts

    # --resume of it: registered now, its recorded result shown, nothing trained again.
    _unregister(registry, run_id)
    assert _registered(registry) == set()
    code, out, err = _cli(capsys, "train", str(config), *FAST, "--resume", str(run_dir))
    assert code == 0, err
    assert f"run {run_id} had finished" in err and "stopped before registering itself" in err
    record = json.loads((run_dir / "record.json").read_text())
    assert f"run {run_dir}" in out and f"{record['metrics']['test_acc']:.4f}" in out
    assert "training on" not in err  # nothing was trained
    with Registry(registry) as reg:
        entry = reg.get(run_id)
    assert entry.metrics == record["metrics"] and entry.artifacts == artifacts
    assert [p.name for p in runs.iterdir()] == [run_id]

    # Once registered, --resume refuses as before, saying where to look.
    code, _, err = _cli(capsys, "train", str(config), *FAST, "--resume", str(run_dir))
    assert code == 2 and "already finished" in err and f"unipt runs show {run_id}" in err

    # `unipt runs register DIR`, and again (nothing to do).
    _unregister(registry, run_id)
    code, out, _ = _cli(capsys, "runs", "register", str(run_dir), "--registry", str(registry))
    assert code == 0 and f"registered run {run_id}" in out and _registered(registry) == {run_id}
    code, out, _ = _cli(capsys, "runs", "register", str(run_dir), "--registry", str(registry))
    assert code == 0 and "already in" in out

    # The next `unipt train` with this registry registers it before it trains its own run.
    _unregister(registry, run_id)
    code, _, err = _cli(capsys, "train", str(config), *FAST)
    assert code == 0 and "registered 1 finished run(s) that had stopped before registering themselves" in err
    assert err.index(run_id) < err.index("training on")
    assert run_id in _registered(registry) and len(_registered(registry)) == 2


def test_runs_register_refuses_what_is_not_a_finished_run(tmp_path, capsys):
    registry = str(tmp_path / "registry.sqlite")
    run_dir = write_run_record(tmp_path / "runs", _record("run-1"))
    other = tmp_path / "runs" / "run-2"
    shutil.copytree(run_dir, other)  # a record moved into another run's folder
    (tmp_path / "runs" / "empty").mkdir()
    unfinished = tmp_path / "runs" / "unfinished"
    unfinished.mkdir()
    (unfinished / "checkpoint.pt").write_bytes(b"")
    for folder, says in [
        (other, "is not the record of run run-2"),
        (tmp_path / "runs" / "empty", "no record"),
        (unfinished, f"did not finish (a checkpoint.pt, no record.json in {unfinished}); continue it with "),
    ]:
        code, _, err = _cli(capsys, "runs", "register", str(folder), "--registry", registry)
        assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not Path(registry).exists() or _registered(Path(registry)) == set()


def _make_read_only(path: Path) -> bool:
    """chmod 444; root ignores modes, so there the file is also made immutable (False: cannot)."""
    path.chmod(0o444)
    if os.geteuid() == 0:
        return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    return True


@pytest.mark.parametrize("fault", ["read-only", "garbage", "locked"])
def test_a_bad_registry_fails_in_one_line_before_any_work(tiny_config, tmp_path, capsys, monkeypatch, fault):
    registry = tmp_path / "registry.sqlite"
    Registry(registry).close()
    holder = None
    if fault == "read-only" and not _make_read_only(registry):
        pytest.skip("cannot make a file read-only for root here (no chattr)")
    if fault == "garbage":
        registry.write_bytes(os.urandom(8192))
        for side in ("-wal", "-shm"):
            Path(f"{registry}{side}").unlink(missing_ok=True)
    if fault == "locked":
        monkeypatch.setattr("unipt.pipeline.runs.registry.BUSY_TIMEOUT_S", 1.0)  # the real wait is 60 s
        holder = sqlite3.connect(registry, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
    try:
        code, _, err = _cli(capsys, "run", str(tiny_config), *FAST)
    finally:
        if holder is not None:
            holder.execute("ROLLBACK")
            holder.close()
        if fault == "read-only" and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(registry)], check=True)
    assert code == 2 and err.count("\n") == 1 and err.startswith("unipt: error: run registry"), err
    says = {
        "read-only": ["is read-only", "nothing was run", "chmod u+w", "run the same command again"],
        "garbage": ["is damaged", "(file is not a database)", "move it aside (mv "],
        "locked": ["stayed locked", "nothing was run", "run the same command again"],
    }[fault]
    assert all(part in err for part in says), err
    # Checked before extraction and training: no cache, no run folder, no checkpoint.
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


@pytest.mark.faults
def test_a_registry_that_fails_at_registration_names_the_command_that_registers_later(tmp_path):
    registry = tmp_path / "registry.sqlite"
    Registry(registry).close()
    run_dir = write_run_record(tmp_path / "runs", _record("run-1"))
    if not _make_read_only(registry):
        pytest.skip("cannot make a file read-only for root here (no chattr)")
    try:
        with Registry(registry) as reg, pytest.raises(UniptError) as raised:
            reg.register(_record("run-1"), {"run_dir": str(run_dir)})
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(registry)], check=True)
    message = str(raised.value)
    assert "run run-1 finished but could not be registered" in message and "is read-only" in message
    assert f"`unipt runs register {run_dir} --registry {registry}`" in message


def test_a_full_or_failing_disk_is_named_with_what_to_run(tmp_path):
    what, fix = failure(tmp_path / "r.sqlite", sqlite3.OperationalError("disk I/O error"))
    assert "full or failing" in what and f"df -h {tmp_path}" in fix
    what, _ = failure(tmp_path / "r.sqlite", sqlite3.OperationalError("database or disk is full"))
    assert "full or failing" in what


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a disk that fills up for real (needs the right to mount; skipped without it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(disk: Path, leave: int = 0) -> None:
    """Write a file until the disk is full (then give ``leave`` bytes back)."""
    with open(disk / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass
    if leave:
        with open(disk / "filler", "r+b") as handle:
            handle.truncate((disk / "filler").stat().st_size - leave)


@pytest.mark.faults
def test_a_full_registry_disk_fails_before_any_work(tiny_config, tmp_path, capsys, small_disk):
    registry = small_disk / "registry.sqlite"
    Registry(registry).close()
    _fill(small_disk, leave=64 << 10)
    code, _, err = _cli(capsys, "run", str(tiny_config), *FAST, "--registry", str(registry))
    assert code == 2 and err.count("\n") == 1, err
    assert f"the disk holding run registry {registry} has" in err and "too little to register a run" in err
    assert f"df -h {small_disk}" in err and "nothing was run" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


@pytest.mark.faults
def test_a_disk_that_fills_before_registration_names_the_command_that_registers_later(tmp_path, small_disk):
    registry = small_disk / "registry.sqlite"
    run_dir = write_run_record(tmp_path / "runs", _record("run-1"))
    big = _record("run-1", config={"name": "t", "notes": "x" * 200_000})  # needs pages the disk lacks
    with Registry(registry) as reg:  # opened (and checked) before the work, as `unipt run` does
        reg.check_writable()
        _fill(small_disk)  # then the disk fills while the run trains
        with pytest.raises(UniptError) as raised:
            reg.register(big, {"run_dir": str(run_dir)})
    message = str(raised.value)
    assert "disk holding it is full or failing" in message and f"df -h {small_disk}" in message
    assert f"`unipt runs register {run_dir} --registry {registry}`" in message


def test_only_runs_recorded_for_this_registry_are_registered_from_a_shared_runs_root(tmp_path):
    registry, runs = tmp_path / "registry.sqlite", tmp_path / "runs"
    write_run_record(runs, _record("mine", registry=registry_id(registry)))
    write_run_record(runs, _record("theirs", registry=registry_id(tmp_path / "other.sqlite")))
    write_run_record(runs, _record("unnamed"))  # older records say nothing: left as they are
    (runs / "broken").mkdir()
    (runs / "broken" / "record.json").write_text("[1]")  # JSON, but no record: a warning, no stop
    assert ready_registry(registry, runs) == ["mine"]
    assert _registered(registry) == {"mine"}
    assert ready_registry(registry, runs) == []  # once is enough
