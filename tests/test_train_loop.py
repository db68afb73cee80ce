"""The training loop on a small synthetic cache: determinism, a split without validation, and learning a
label the activations carry."""

from __future__ import annotations

import math

from tests.conftest import KEY, build_cache
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.config import TrainConfig
from unipt.train.tasks import train_task

LENGTHS = [4, 6, 3, 5, 7, 2, 6, 5, 4, 3, 6, 5]


def _reader(tmp_path, splits, lengths=LENGTHS, label_shift=0.0):
    build_cache(
        CacheRoot(tmp_path), lengths, {0: 8, 1: 8, 2: 8}, shard_size=5, splits=splits, label_shift=label_shift
    )
    return open_cache(CacheRoot(tmp_path).location(KEY))


# 40 examples, labels alternating (chance: 0.5) and carried by every token (shifted by +-0.75 per label):
# 28 train, 12 test, no validation split.
LEARNABLE = dict(lengths=[3, 5, 4, 6, 2] * 8, label_shift=0.75)
LEARNABLE_SPLITS = ["train"] * 28 + ["test"] * 12


def test_same_seed_same_result(tmp_path):
    reader = _reader(tmp_path, ["train"] * 8 + ["val"] * 2 + ["test"] * 2)
    config = TrainConfig(epochs=3, batch_size=4, block_examples=3, embed_size=8)
    one, two = (train_task(reader, config, seed=7, progress=False) for _ in range(2))
    assert [h["train_loss"] for h in one.history] == [h["train_loss"] for h in two.history]
    assert one.layer_weights == two.layer_weights
    assert one.metrics["best_epoch"] == two.metrics["best_epoch"]
    three = train_task(reader, config, seed=8, progress=False)
    assert [h["train_loss"] for h in three.history] != [h["train_loss"] for h in one.history]


def test_without_validation_the_lowest_training_loss_wins(tmp_path):
    reader = _reader(tmp_path, LEARNABLE_SPLITS, **LEARNABLE)
    config = TrainConfig(epochs=3, batch_size=4, embed_size=8, lr=3e-2)
    result = train_task(reader, config, seed=0, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert result.metrics["best_epoch"] == losses.index(min(losses)) + 1
    assert math.isnan(result.metrics["val_acc"])
    assert result.metrics["test_acc"] >= 0.9  # chance is 0.5: the label is learned, not guessed


def test_linear_probe_reports_nan_for_a_missing_split(tmp_path):
    from unipt.train.probe import linear_probe

    reader = _reader(tmp_path, LEARNABLE_SPLITS, **LEARNABLE)
    result = linear_probe(reader)
    assert math.isnan(result["probe_val_acc"])
    assert result["probe_test_acc"] >= 0.9  # chance is 0.5
