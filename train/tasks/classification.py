"""Classification: cross-entropy over the label names; accuracy and macro-F1; a linear probe on the
last layer is fitted as the baseline in the same run (``train.linear_probe``)."""

from __future__ import annotations

import numpy as np
from torch import Tensor, nn

from pipeline.cache import ActivationCache
from pipeline.config import TrainConfig
from train.loop import Head, TrainOptions, TrainResult, train_single_cache
from train.metrics import accuracy, macro_f1
from train.probe import linear_probe


def classification_head(num_classes: int) -> Head:
    def metrics(predictions: Tensor, labels: Tensor) -> dict[str, float]:
        return {"acc": accuracy(predictions, labels), "f1": macro_f1(predictions, labels, num_classes)}

    return Head(
        outputs=num_classes,
        loss=nn.CrossEntropyLoss(),
        collect=lambda logits: logits.argmax(-1).cpu(),
        metrics=metrics,
    )


def train(
    readers: list[ActivationCache], config: TrainConfig, seed: int, options: TrainOptions
) -> TrainResult:
    def make_head(reader: ActivationCache, _train_labels: np.ndarray) -> Head:
        return classification_head(len(reader.label_names))

    result = train_single_cache(readers, config, seed, make_head, options)
    if config.linear_probe:
        result.metrics.update(linear_probe(readers[0], seed))
    return result
