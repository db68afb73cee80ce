"""Baselines with the backbone in memory (UniPT online, full fine-tuning) against training from a cache,
for both one-model tasks (classification, regression)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from benchmarks.online_baselines import fit_online, load_online_data, train_online
from unipt.pipeline import experiment
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.config import load_config
from unipt.pipeline.data.table import load_dataset
from unipt.pipeline.errors import UniptError
from unipt.train.loader import CacheBatches
from unipt.train.tasks import train_task

ROOT = Path(__file__).resolve().parents[1]
# An fp32 cache holds exactly what the backbone computed, so online and cached UniPT see the same inputs.
OVERRIDES = ["extract.dtype=float32", "train.epochs=3", "train.lr=0.01"]


@pytest.fixture(scope="module")
def fp32_setup(tmp_path_factory, tiny_bert_dir):
    from tests.conftest import make_sentiment_rows, write_config, write_csv

    root = tmp_path_factory.mktemp("online")
    csv_path = write_csv(root / "sentiment.csv", make_sentiment_rows(160))
    config_path = write_config(root / "tiny.yaml", str(csv_path), str(tiny_bert_dir), root)
    return config_path, load_config(config_path, OVERRIDES)


@pytest.fixture(scope="module")
def fp32_cache(fp32_setup, ray_session):
    config_path, config = fp32_setup
    prep = experiment.prepare(config)
    reader = open_cache(experiment.extract(prep, progress=False).path)
    return prep, reader


@pytest.fixture(scope="module")
def online_data(fp32_cache):
    prep, _ = fp32_cache
    config = prep.config
    return load_online_data(
        prep.dataset.table, prep.dataset.label_names, config.backbone, config.train, config.extract
    )


@pytest.mark.slow
def test_online_batches_are_the_cache_batches(fp32_cache, online_data):
    prep, reader = fp32_cache
    train = prep.config.train
    cached = CacheBatches.for_split(reader, "train", train, seed=0, shuffle=True)
    online = online_data.batches("train", True, train, 0, online_data.hidden_states)
    assert len(online) == len(cached)
    for epoch in (0, 1):
        pairs = list(zip(cached.epoch(epoch), online.epoch(epoch), strict=True))
        for from_cache, live in pairs:
            np.testing.assert_array_equal(from_cache.indices, live.indices)
            assert torch.equal(from_cache.mask, live.mask)
            assert torch.equal(from_cache.labels, live.labels)
            for a, b in zip(from_cache.hidden, live.hidden, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_online_blocks_follow_the_cache_loaders_memory_budget(fp32_cache, online_data):
    prep, reader = fp32_cache
    train = prep.config.train.model_copy(update={"loader_memory_mb": 1, "block_examples": 1000})
    cached = CacheBatches.for_split(reader, "train", train, seed=0, shuffle=True)
    online = online_data.batches("train", True, train, 0, online_data.hidden_states)
    assert max(len(block) for block in cached.blocks) < min(train.block_examples, len(cached.indices))
    assert [b.tolist() for b in online.blocks] == [b.tolist() for b in cached.blocks]
    for from_cache, live in zip(cached.epoch(1), online.epoch(1), strict=True):
        np.testing.assert_array_equal(from_cache.indices, live.indices)


def _task_metrics(metrics: dict) -> set[str]:
    return {key for key in metrics if key.startswith(("val_", "test_"))}


@pytest.mark.slow
def test_unipt_online_trains_the_same_model_as_unipt_from_cache(fp32_cache, online_data):
    prep, reader = fp32_cache
    cached = train_task(reader, prep.config.train, seed=0, progress=False)
    online, _ = fit_online(online_data, prep.config.train, seed=0, method="unipt-online")
    assert _task_metrics(online.metrics) == _task_metrics(cached.metrics) == {
        "val_acc", "val_f1", "test_acc", "test_f1"
    }  # fmt: skip
    assert online.select_metric == cached.select_metric
    for key in ("val_acc", "val_f1", "test_acc", "test_f1", "best_epoch", "trainable_params"):
        assert online.metrics[key] == pytest.approx(cached.metrics[key]), key
    losses = [[h["train_loss"] for h in r.history] for r in (cached, online)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    np.testing.assert_allclose(online.layer_weights, cached.layer_weights, rtol=1e-4)
    assert online.metrics["peak_rss_mib"] > 0 and online.metrics["backbone_params"] > 0


@pytest.mark.slow
def test_full_finetune_trains_the_backbone(fp32_setup, tiny_bert_dir):
    _, config = fp32_setup
    from unipt.pipeline.data.table import load_dataset

    dataset = load_dataset(config.dataset)
    train = config.train.model_copy(update={"epochs": 1})
    data = load_online_data(dataset.table, dataset.label_names, config.backbone, train, config.extract)
    result, model = fit_online(data, train, seed=0, method="full-finetune", finetune_lr=1e-3)
    before = load_file(tiny_bert_dir / "model.safetensors")
    after = model.backbone.state_dict()
    changed = [name for name, value in before.items() if not torch.equal(value, after[name])]
    assert "encoder.layer.0.attention.self.query.weight" in changed
    backbone_params = result.metrics["backbone_params"]
    head_params = (32 + 1) * 2  # a linear layer from the tiny BERT's width 32 to two classes
    assert result.metrics["trainable_params"] == backbone_params + head_params
    assert result.metrics["lr"] == 1e-3
    unipt = train_online(dataset.table, dataset.label_names, config.backbone, train, 0, "unipt-online")
    assert unipt.metrics["trainable_params"] < result.metrics["trainable_params"]
    assert unipt.metrics["backbone_params"] == backbone_params  # in memory, but not trained
    with pytest.raises(UniptError, match="unknown online method"):
        fit_online(data, train, seed=0, method="adapters")


@pytest.mark.e2e
def test_benchmark_tiny_runs_all_four_methods(fp32_setup, fp32_cache, tmp_path):
    config_path, _ = fp32_setup
    out = tmp_path / "baselines.json"
    overrides = [arg for item in OVERRIDES for arg in ("--set", item)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "baselines.py"), "--config", str(config_path), "--tiny",
         "--epochs", "1", *overrides, "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"linear-probe", "unipt-cache", "unipt-online", "full-finetune"}
    assert report["cache_hit"]  # the fixture built it: the benchmark loaded no backbone to extract
    assert not rows["unipt-cache"]["transformers_loaded"] and not rows["linear-probe"]["transformers_loaded"]
    assert rows["unipt-online"]["transformers_loaded"]
    assert rows["unipt-cache"]["trainable_params"] == rows["unipt-online"]["trainable_params"]
    assert rows["full-finetune"]["trainable_params"] > rows["unipt-online"]["trainable_params"]
    assert rows["unipt-cache"]["epoch_time_ratio"] == 1.0
    for row in rows.values():
        assert 0 <= row["test_acc"] <= 1 and row["peak_rss_mib"] > 0
    # The fp32 cache holds what the backbone computes, so online and cached UniPT train the same model
    # (test_unipt_online_trains_the_same_model_as_unipt_from_cache): the table shows the same accuracy.
    assert rows["unipt-online"]["test_acc"] == pytest.approx(rows["unipt-cache"]["test_acc"])
    csv_lines = out.with_suffix(".csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("method,")
    assert "unipt-online" in result.stdout


# --- regression --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def regression_cache(tmp_path_factory, tiny_bert_dir, ray_session):
    from tests.conftest import make_score_rows, write_config, write_csv

    root = tmp_path_factory.mktemp("online_regression")
    csv_path = write_csv(root / "scores.csv", make_score_rows(160, column="label"))
    config_path = write_config(
        root / "scores.yaml", str(csv_path), str(tiny_bert_dir), root, train={"task": "regression"}
    )
    prep = experiment.prepare(load_config(config_path, OVERRIDES))
    reader = open_cache(experiment.extract(prep, progress=False).path)
    config = prep.config
    data = load_online_data(
        prep.dataset.table, prep.dataset.label_names, config.backbone, config.train, config.extract
    )
    return prep, reader, data


@pytest.mark.slow
def test_unipt_online_regression_trains_the_same_model_as_unipt_from_cache(regression_cache):
    prep, reader, data = regression_cache
    cached = train_task(reader, prep.config.train, seed=0, progress=False)
    online, _ = fit_online(data, prep.config.train, seed=0, method="unipt-online")
    names = ("mse", "pearson", "spearman")
    assert (
        _task_metrics(online.metrics)
        == _task_metrics(cached.metrics)
        == {f"{split}_{name}" for split in ("val", "test") for name in names}
    )
    assert online.select_metric == cached.select_metric == "pearson"  # the regression headline
    for key in [f"{s}_{n}" for s in ("val", "test") for n in names] + ["best_epoch", "trainable_params"]:
        assert online.metrics[key] == pytest.approx(cached.metrics[key]), key
    losses = [[h["train_loss"] for h in r.history] for r in (cached, online)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    np.testing.assert_allclose(online.layer_weights, cached.layer_weights, rtol=1e-4)
    assert cached.metrics["test_pearson"] > 0.3  # it learned something, so the comparison means something


@pytest.mark.slow
def test_full_finetune_trains_the_backbone_for_regression(regression_cache, tiny_bert_dir):
    prep, _, data = regression_cache
    train = prep.config.train.model_copy(update={"epochs": 3})
    result, model = fit_online(data, train, seed=0, method="full-finetune", finetune_lr=1e-3)
    before = load_file(tiny_bert_dir / "model.safetensors")
    after = model.backbone.state_dict()
    changed = [name for name, value in before.items() if not torch.equal(value, after[name])]
    assert "encoder.layer.0.attention.self.query.weight" in changed
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0], losses
    assert _task_metrics(result.metrics) == {
        f"{split}_{name}" for split in ("val", "test") for name in ("mse", "pearson", "spearman")
    }
    assert result.select_metric == "pearson" and np.isfinite(result.metrics["test_mse"])
    head_params = 32 + 1  # one output from the tiny BERT's width 32
    assert result.metrics["trainable_params"] == result.metrics["backbone_params"] + head_params


@pytest.mark.slow
def test_online_baselines_refuse_retrieval_and_labels_of_the_other_kind(regression_cache, fp32_setup):
    prep, _, data = regression_cache
    config = prep.config
    retrieval = config.train.model_copy(update={"task": "retrieval"})
    table, names = prep.dataset.table, prep.dataset.label_names
    for call in (
        lambda: load_online_data(table, names, config.backbone, retrieval, config.extract),
        lambda: fit_online(data, retrieval, seed=0, method="full-finetune"),
    ):
        with pytest.raises(UniptError, match="online baselines .* train.task 'retrieval'") as caught:
            call()
        assert "\n" not in str(caught.value) and "unipt run" in str(caught.value)
    # Class labels trained as regression (or numbers as classes) would be a wrong number: refused.
    classification = config.train.model_copy(update={"task": "classification"})
    with pytest.raises(UniptError, match="train.task is 'classification' but the dataset holds numeric"):
        fit_online(data, classification, seed=0, method="unipt-online")
    _, cls_config = fp32_setup
    classes = load_dataset(cls_config.dataset)
    with pytest.raises(UniptError, match="train.task is 'regression' but the dataset holds class labels"):
        load_online_data(classes.table, classes.label_names, config.backbone, config.train, config.extract)
