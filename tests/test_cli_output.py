"""What the CLI writes when a tool or a log file reads it, not a person at a terminal."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import KEY, build_cache, run_cli

from unipt.pipeline.cache.root import CacheRoot


def test_progress_bars_stay_out_of_a_log_file(tmp_path: Path):
    """stderr is a pipe here, as in a log file: no bar, no carriage returns or cursor escapes."""
    root = CacheRoot(tmp_path / "cache")
    build_cache(root, [3, 5, 2, 4, 6, 1, 2], {0: 4, 1: 4}, shard_size=2)
    result = run_cli("cache", "verify", str(root.location(KEY)))
    assert result.stdout.startswith("ok:")
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr and "file/s" not in result.stderr


def test_unipt_home_is_where_every_command_looks_wherever_it_runs(tmp_path: Path):
    import os
    import subprocess
    import sys

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    build_cache(CacheRoot(home / "cache"), [3, 5, 2], {0: 4}, shard_size=2)
    (elsewhere / "c.yaml").write_text("dataset: {source: d.csv}\nbackbone: {name_or_path: m}\n")
    env = {**os.environ, "UNIPT_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def unipt(*args: str) -> str:
        command = [sys.executable, "-m", "unipt.pipeline.cli", *args]
        done = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert KEY in unipt("cache", "ls")
    storage = subprocess.run(
        [
            sys.executable,
            "-c",
            "from unipt.pipeline.config import load_config; print(load_config('c.yaml').storage)",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("cache", "runs", "registry.sqlite"):
        assert f"{home}/{name}" in storage


def _run_one(tmp_path: Path, tiny_bert_dir: Path):
    """One classification run (tiny BERT, 160 labelled rows) registered under tmp_path."""
    from conftest import make_sentiment_rows, write_config, write_csv

    from unipt.pipeline import experiment
    from unipt.pipeline.config import load_config

    data = write_csv(tmp_path / "reviews.csv", make_sentiment_rows(160))
    config = write_config(tmp_path / "c.yaml", str(data), str(tiny_bert_dir), tmp_path, train={"epochs": 2})
    prep = experiment.prepare(load_config(config))
    return data, prep, experiment.run(prep, progress=False)


@pytest.mark.e2e
def test_json_listings_and_a_split_s_ids_let_evaluate_be_checked_against_the_run(
    tmp_path: Path, tiny_bert_dir: Path, ray_session, capsys
):
    import csv

    from conftest import strict_json

    from unipt.pipeline.cli.app import main

    data, prep, run = _run_one(tmp_path, tiny_bert_dir)
    registry, cache_root = str(tmp_path / "registry.sqlite"), str(tmp_path / "cache")
    metrics = run.trained.metrics
    capsys.readouterr()

    def unipt_json(*args: str):
        assert main([*args, "--json"]) == 0
        return strict_json(capsys.readouterr().out)  # stdout holds the JSON and nothing else

    (listed,) = unipt_json("runs", "ls", "--registry", registry)
    assert listed["run_id"] == run.run_id and listed["headline"] == "acc"
    assert listed["test"] == metrics["test_acc"] and listed["cache_key"] == prep.key
    assert listed["metrics"]["val_f1"] == metrics["val_f1"]
    shown = unipt_json("runs", "show", run.run_id[:12], "--registry", registry)
    assert shown["run_id"] == run.run_id and shown["metrics"]["test_acc"] == metrics["test_acc"]

    # The test split's ids are the dataset's test rows, read from the run's cache.
    test_ids = unipt_json("runs", "show", run.run_id, "--split", "test", "--registry", registry)
    table = prep.dataset.table
    splits = table.column("split").to_pylist()
    expected = [i for i, s in zip(table.column("example_id").to_pylist(), splits, strict=True) if s == "test"]
    assert sorted(test_ids) == sorted(expected) and len(test_ids) == prep.dataset.split_counts()["test"]
    assert main(["runs", "show", run.run_id, "--split", "val", "--registry", registry]) == 0
    val_ids = capsys.readouterr().out.split()
    assert len(val_ids) == prep.dataset.split_counts()["val"] and not set(val_ids) & set(test_ids)

    # A view lists what reading it reads: its own files and the segments under it.
    listing = unipt_json("cache", "ls", "--cache-root", cache_root)
    (view,) = listing["caches"]
    (space,) = listing["spaces"]
    assert view["key"] == prep.key and view["kind"] == "view" and view["examples"] == 160
    assert view["bytes"] == view["own_bytes"] + space["bytes"] and space["bytes"] > view["own_bytes"]
    assert main(["cache", "ls", "--cache-root", cache_root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["key", "backbone", "dtype", "examples", "tokens", "reads"]
    from unipt.pipeline.log import human_bytes

    assert human_bytes(view["bytes"]) in lines[1] and lines[1].startswith(prep.key)
    info = unipt_json("cache", "info", prep.key, "--cache-root", cache_root)
    assert info["key"] == prep.key and info["splits"]["test"] == len(test_ids)

    # evaluate on exactly those rows gives the run's test accuracy, with a per-class report.
    rows = {r["id"]: r for r in csv.DictReader(open(data))}
    labelled = tmp_path / "test.csv"
    with open(labelled, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "text", "label"])
        writer.writeheader()
        writer.writerows(rows[i] for i in test_ids)
    out = tmp_path / "metrics.json"
    argv = ["evaluate", run.run_id, "--input", str(labelled), "--registry", registry, "--device", "cpu"]
    evaluation = unipt_json(*argv, "--no-progress", "--out", str(out))
    assert evaluation == strict_json(out.read_text())
    assert evaluation["metrics"]["acc"] == pytest.approx(metrics["test_acc"]) and evaluation[
        "examples"
    ] == len(test_ids)
    report = evaluation["report"]
    assert report["labels"] == ["neg", "pos"]
    supports = {name: sum(rows[i]["label"] == name for i in test_ids) for name in ("neg", "pos")}
    assert {name: c["support"] for name, c in report["per_class"].items()} == supports
    assert [sum(row) for row in report["confusion"]] == [supports["neg"], supports["pos"]]
    correct = report["confusion"][0][0] + report["confusion"][1][1]
    assert correct / len(test_ids) == pytest.approx(metrics["test_acc"])
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("acc ") and printed[1].split() == [
        "class",
        "precision",
        "recall",
        "f1",
        "support",
    ]
    assert printed[2].startswith("neg ") and "confusion" in printed[4]

    # evaluate's progress bar (a terminal's) is named for what it does.
    from unipt.pipeline.model.predict import load_model

    model = load_model(run.run_dir, device="cpu")
    model.evaluation([rows[i]["text"] for i in test_ids], [rows[i]["label"] for i in test_ids], progress=True)
    bar = capsys.readouterr().err
    assert "evaluate" in bar and "predict" not in bar


@pytest.mark.slow
def test_ray_s_notices_and_colours_stay_out_of_a_log(tmp_path: Path):
    """A local Ray started the way unipt starts it, in a process whose output goes to files (a log):
    three workers print the same line; each comes through as plain text, with no auth-token notice, no
    `[repeated 3x across cluster]` fold and no colour codes."""
    import subprocess
    import sys

    script = (
        "import ray, sys\n"
        "from unipt.extract.ray_session import connect\n"
        "assert connect(None)\n"
        "@ray.remote\n"
        "def hello(i):\n"
        "    print('hello from a worker', flush=True)\n"
        "    return i\n"
        "assert sorted(ray.get([hello.remote(i) for i in range(3)])) == [0, 1, 2]\n"
        "import time; time.sleep(3)\n"  # the workers' lines reach the driver asynchronously
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RAY_DEDUP_LOGS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert said.count("hello from a worker") == 3, said[-3000:]
    assert "Token authentication is enabled" not in said and "repeated" not in said
    assert "\x1b[" not in said and "RAY_DEDUP_LOGS" not in said
