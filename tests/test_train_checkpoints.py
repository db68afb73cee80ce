"""Checkpoints, resume, early stopping and regression in the training loop, on small synthetic caches."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests.conftest import KEY, build_cache
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cache.writer import CacheBuilder
from unipt.pipeline.config import TrainConfig
from unipt.pipeline.errors import UniptError
from unipt.train.checkpoint import CHECKPOINT_FILE, resolve_checkpoint, resume_point
from unipt.train.tasks import train_task

LENGTHS = [4, 6, 3, 5, 7, 2, 6, 5, 4, 3, 6, 5, 4, 5, 3, 6]
SPLITS = ["train"] * 10 + ["val"] * 3 + ["test"] * 3
CONFIG = TrainConfig(epochs=3, batch_size=4, block_examples=3, embed_size=8, dropout=0.2)


class Interrupted(Exception):
    pass


def _reader(tmp_path):
    build_cache(CacheRoot(tmp_path), LENGTHS, {0: 8, 1: 8, 2: 8}, shard_size=5, splits=SPLITS)
    return open_cache(CacheRoot(tmp_path).location(KEY))


def _without_timing(result) -> tuple[dict, list[dict]]:
    metrics = {k: v for k, v in result.metrics.items() if "seconds" not in k}
    return metrics, [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in result.history]


def _stop_after(epochs: int):
    def hook(epoch: int, record: dict) -> None:
        if epoch == epochs:
            raise Interrupted

    return hook


@pytest.mark.slow
def test_resume_after_an_interrupted_epoch_reaches_the_uninterrupted_result(tmp_path):
    reader = _reader(tmp_path / "cache")
    uninterrupted = train_task(reader, CONFIG, seed=3, progress=False)

    checkpoint = tmp_path / "run" / CHECKPOINT_FILE
    with pytest.raises(Interrupted):
        train_task(reader, CONFIG, seed=3, progress=False, checkpoint=checkpoint, on_epoch_end=_stop_after(1))
    saved = torch.load(checkpoint, weights_only=True)  # plain tensors and types only
    assert saved["epoch"] == 1 and len(saved["history"]) == 1
    assert not list(checkpoint.parent.glob(".*.tmp"))  # written via a temporary file, then renamed

    resumed = train_task(
        reader,
        CONFIG,
        seed=3,
        progress=False,
        checkpoint=checkpoint,
        resume=resolve_checkpoint(checkpoint.parent),
    )
    assert _without_timing(resumed) == _without_timing(uninterrupted)
    assert resumed.layer_weights == uninterrupted.layer_weights
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 3


def test_resume_refuses_other_settings_and_missing_checkpoints(tmp_path):
    reader = _reader(tmp_path / "cache")
    checkpoint = tmp_path / "run" / CHECKPOINT_FILE
    with pytest.raises(Interrupted):
        train_task(reader, CONFIG, seed=3, progress=False, checkpoint=checkpoint, on_epoch_end=_stop_after(1))
    with pytest.raises(UniptError, match=r"train\.lr was 0\.001, now 0\.5"):
        train_task(reader, CONFIG.model_copy(update={"lr": 0.5}), seed=3, progress=False, resume=checkpoint)
    with pytest.raises(UniptError, match="seed was 3, now 4"):
        train_task(reader, CONFIG, seed=4, progress=False, resume=checkpoint)
    with pytest.raises(UniptError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path / "elsewhere")
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(UniptError, match="could not be read"):
        train_task(reader, CONFIG, seed=3, progress=False, resume=checkpoint)


def test_a_resume_point_is_the_checkpoint_read_once_with_the_runs_id_and_threads(tmp_path):
    """What the recipe reads from a checkpoint (its run id, its thread count) and what training continues
    from come from one read of it."""
    reader = _reader(tmp_path / "cache")
    checkpoint = tmp_path / "runs" / "run-a" / CHECKPOINT_FILE
    meta = {"run_id": "run-b", "torch_threads": 3}
    with pytest.raises(Interrupted):
        train_task(reader, CONFIG, 3, False, checkpoint=checkpoint, meta=meta, on_epoch_end=_stop_after(1))
    point = resume_point(checkpoint.parent)
    assert point.path == checkpoint and point.run_id == "run-b" and point.torch_threads == 3
    assert len(point.state["history"]) == 1  # the states training continues from, in the same read

    # A checkpoint whose meta says nothing usable: the run is its folder's, the thread count unknown.
    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "meta": ["not", "a", "mapping"]}, checkpoint)
    point = resume_point(checkpoint)
    assert point.run_id == "run-a" and point.torch_threads is None


@pytest.mark.slow
def test_early_stopping_ends_after_patience_epochs_without_improvement(tmp_path):
    reader = _reader(tmp_path / "cache")
    config = CONFIG.model_copy(update={"epochs": 30, "early_stopping_patience": 2, "lr": 0.05})
    result = train_task(reader, config, seed=0, progress=False)
    epochs = len(result.history)
    assert epochs < 30 and result.metrics["stopped_early"] is True
    assert epochs == result.metrics["best_epoch"] + 2
    best = max(h["val_acc"] for h in result.history)
    assert result.history[result.metrics["best_epoch"] - 1]["val_acc"] == best
    assert all(h["val_acc"] <= best for h in result.history[-2:])
    without = train_task(reader, config.model_copy(update={"early_stopping_patience": None}), 0, False)
    assert len(without.history) == 30 and without.metrics["stopped_early"] is False


def _regression_reader(tmp_path, n: int = 120):
    """Targets are a fixed function of the cached tokens (plus a shift and scale), so they are learnable."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 8, size=n).tolist()
    splits = ["train"] * (n * 6 // 10) + ["val"] * (n * 2 // 10) + ["test"] * (n - n * 8 // 10)
    root = CacheRoot(tmp_path)
    tokens, layout = build_cache(
        root, lengths, {0: 8, 1: 8, 2: 8}, shard_size=32, chunk_rows=64, commit=False
    )
    targets = [50.0 + 10.0 * float(tokens[2][i][:, 0].astype(np.float32).mean()) for i in range(n)]
    table = pa.table(
        {"example_id": [str(i) for i in range(n)], "label": pa.array(targets, pa.float64()), "split": splits}
    )
    CacheBuilder(root, KEY).commit(layout, table, {"label_names": []})
    return open_cache(root.location(KEY)), np.array(targets)


@pytest.mark.slow
def test_regression_learns_a_numeric_target_and_reports_correlations(tmp_path):
    reader, targets = _regression_reader(tmp_path)
    config = TrainConfig(task="regression", epochs=15, batch_size=8, lr=5e-3, embed_size=16, dropout=0.0)
    result = train_task(reader, config, seed=0, progress=False)
    m = result.metrics
    assert set(m) >= {"val_mse", "val_pearson", "val_spearman", "test_mse", "test_pearson", "test_spearman"}
    assert m["test_pearson"] > 0.6 and m["test_spearman"] > 0.6, m
    assert m["test_mse"] < targets.var()  # better than predicting the mean
    assert all(-1.0 <= h["val_pearson"] <= 1.0 for h in result.history)

    with pytest.raises(UniptError, match="set train.task: regression"):
        train_task(reader, config.model_copy(update={"task": "classification"}), 0, False)


def test_regression_refuses_a_cache_of_class_labels(tmp_path):
    reader = _reader(tmp_path)
    with pytest.raises(UniptError, match="holds class labels"):
        train_task(reader, TrainConfig(task="regression"), 0, False)
    with pytest.raises(UniptError, match="two caches"):
        train_task(reader, TrainConfig(task="retrieval"), 0, False)


def test_amp_is_off_on_cpu(tmp_path):
    from unipt.train.fit import amp_dtype

    for setting in ("auto", "off", "bfloat16", "float16"):
        assert amp_dtype(setting, torch.device("cpu")) is None
    assert math.isfinite(
        train_task(_reader(tmp_path), CONFIG.model_copy(update={"amp": "float16"}), 0, False).metrics[
            "val_acc"
        ]
    )
