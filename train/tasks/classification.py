"""Classification: cross-entropy over the label names; accuracy and macro-F1, per-class precision, recall,
F1 and the confusion matrix; a linear probe on the last layer (``train.probe_baseline``) and the majority
class are the baselines in the same run."""

from __future__ import annotations

import numpy as np
from torch import Tensor, nn

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.config import TrainConfig
from unipt.train.loop import Head, TrainOptions, TrainResult, train_single_cache
from unipt.train.metrics import accuracy, class_report, macro_f1
from unipt.train.probe import linear_probe, majority_baseline


def classification_head(num_classes: int, label_names: list[str] | None = None) -> Head:
    def metrics(predictions: Tensor, labels: Tensor) -> dict[str, float]:
        return {"acc": accuracy(predictions, labels), "f1": macro_f1(predictions, labels)}

    names = label_names or [str(i) for i in range(num_classes)]
    return Head(
        outputs=num_classes,
        loss=nn.CrossEntropyLoss(),
        collect=lambda logits: logits.argmax(-1).cpu(),
        metrics=metrics,
        report=lambda predictions, labels: class_report(predictions, labels, names),
    )


def make_head(label_names: list[str], _train_labels: np.ndarray) -> Head:
    """The task's head for a dataset's label names (the seam a cache run and the online baselines share)."""
    return classification_head(len(label_names), list(label_names))


def train(
    readers: list[ActivationCache], config: TrainConfig, seed: int, options: TrainOptions
) -> TrainResult:
    result = train_single_cache(readers, config, seed, make_head, options)
    result.metrics.update(majority_baseline(readers[0]))
    if config.probe_baseline:
        # The probe's L2 strength is chosen by the metric that chose UniPT's best epoch.
        result.metrics.update(linear_probe(readers[0], seed, select=result.select_metric or "acc"))
    return result
