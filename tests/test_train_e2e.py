"""`unipt run/train` end to end: plots beside the record, a killed run resumed exactly, regression."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from tests.conftest import make_score_rows, write_config, write_csv
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cli.app import main
from unipt.pipeline.config import DatasetConfig
from unipt.pipeline.data.table import load_dataset
from unipt.pipeline.errors import UniptError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPOCHS = 20


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "record.json").read_text())


def _comparable(record: dict) -> tuple[dict, list[dict]]:
    metrics = {k: v for k, v in record["metrics"].items() if "seconds" not in k}
    return metrics, [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in record["history"]]


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def _kill_after_first_checkpoint(args: list[str], runs_root: Path, skip: set[Path]) -> Path:
    """Start `unipt ARGS` in a fresh interpreter, SIGKILL it once its first checkpoint exists."""
    process = subprocess.Popen(
        [sys.executable, "-m", "unipt.pipeline.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            found = [p for p in runs_root.glob("*/checkpoint.pt") if p.parent not in skip]
            if found:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
                return found[0].parent
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    raise AssertionError(
        f"no checkpoint before the run ended ({process.returncode}): {process.stderr.read()}"
    )


@pytest.mark.e2e
def test_run_writes_plots_and_a_killed_run_resumes_to_the_same_result(
    ray_session, tiny_config, tmp_path, capsys
):
    runs = tmp_path / "runs"
    epochs = f"train.epochs={EPOCHS}"
    assert main(["run", str(tiny_config), "--no-progress", "--set", epochs]) == 0
    (full_dir,) = runs.iterdir()
    _assert_png(full_dir / "curves.png")
    _assert_png(full_dir / "layer_weights.png")
    assert torch.load(full_dir / "checkpoint.pt", weights_only=True)["epoch"] == EPOCHS

    killed = _kill_after_first_checkpoint(
        ["train", str(tiny_config), "--no-progress", "--set", epochs], runs, skip={full_dir}
    )
    assert not (killed / "record.json").exists()
    stopped_at = torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= stopped_at < EPOCHS

    capsys.readouterr()
    assert main(["run", str(tiny_config), "--no-progress", "--set", epochs, "--resume", str(killed)]) == 0
    assert f"resuming run {killed.name}" in capsys.readouterr().err
    resumed, full = _record(killed), _record(full_dir)
    assert _comparable(resumed) == _comparable(full)
    assert resumed["layer_weights"] == full["layer_weights"] and resumed["run_id"] == killed.name
    _assert_png(killed / "curves.png")

    # A finished run cannot be resumed: one line, exit 2.
    assert main(["train", str(tiny_config), "--no-progress", "--set", epochs, "--resume", str(killed)]) == 2
    assert "already finished" in capsys.readouterr().err


def test_regression_dataset_keeps_numbers_and_the_fingerprint_covers_them(tmp_path):
    rows = make_score_rows(40)
    path = write_csv(tmp_path / "scores.csv", rows)
    config = DatasetConfig(source=str(path), id_column="id", label_column="score")
    table = load_dataset(config, task="regression")
    assert table.label_names == [] and table.table.column("label").type == pa.float64()
    ids, labels = table.table.column("example_id").to_pylist(), table.table.column("label").to_pylist()
    by_id = dict(zip(ids, labels, strict=True))
    assert by_id["r0007"] == rows[7]["score"]

    rows[7]["score"] += 0.001
    edited = load_dataset(
        config.model_copy(update={"source": str(write_csv(tmp_path / "b.csv", rows))}), "regression"
    )
    assert edited.fingerprint != table.fingerprint

    integers = [{"id": r["id"], "text": r["text"], "score": i % 3} for i, r in enumerate(rows)]
    source = str(write_csv(tmp_path / "c.csv", integers))
    as_classes = load_dataset(config.model_copy(update={"source": source}))
    as_numbers = load_dataset(config.model_copy(update={"source": source}), "regression")
    assert as_classes.fingerprint != as_numbers.fingerprint

    rows[3]["score"] = "high"
    with pytest.raises(UniptError, match="row 3: label 'high' is not a finite number"):
        load_dataset(
            config.model_copy(update={"source": str(write_csv(tmp_path / "d.csv", rows))}), "regression"
        )


@pytest.mark.e2e
def test_regression_run_end_to_end(ray_session, tmp_path, tiny_bert_dir, capsys):
    csv = write_csv(tmp_path / "scores.csv", make_score_rows(240))
    config = write_config(
        tmp_path / "regression.yaml",
        str(csv),
        str(tiny_bert_dir),
        tmp_path,
        dataset={"label_column": "score"},
        train={"task": "regression", "epochs": 15, "lr": 3e-3, "dropout": 0.0},
    )
    assert main(["run", str(config), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("test pearson ")  # the summary line leads with the headline
    (run_dir,) = (tmp_path / "runs").iterdir()
    record = _record(run_dir)
    metrics = record["metrics"]
    assert metrics["test_pearson"] > 0.5 and metrics["test_spearman"] > 0.5, metrics
    assert math.isfinite(metrics["test_mse"]) and "probe_test_acc" not in metrics
    assert record["dataset"]["label_names"] == []
    reader = open_cache(record["cache"]["path"])
    assert reader.labels().dtype.kind == "f"
    _assert_png(run_dir / "curves.png")
