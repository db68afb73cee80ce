"""Regression: one output trained with MSE on targets standardised by the train split's mean and
standard deviation (so the loss scale does not depend on the label's units); MSE in the label's own
units, Pearson and Spearman. Baselines in the same run: a ridge probe on the last layer
(``train.probe_baseline``) and the train mean."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.config import TrainConfig
from unipt.train.loop import Head, TrainOptions, TrainResult, train_single_cache
from unipt.train.metrics import pearson, spearman
from unipt.train.probe import mean_baseline, ridge_probe


def regression_head(mean: float, std: float) -> Head:
    std = std if std > 0 else 1.0

    def loss(outputs: Tensor, labels: Tensor) -> Tensor:
        return nn.functional.mse_loss(outputs.squeeze(-1), (labels.to(torch.float32) - mean) / std)

    def metrics(predictions: Tensor, labels: Tensor) -> dict[str, float]:
        labels = labels.double()
        return {
            "mse": float((predictions - labels).pow(2).mean()),
            "pearson": pearson(predictions, labels),
            "spearman": spearman(predictions, labels),
        }

    return Head(
        outputs=1,
        loss=loss,
        collect=lambda outputs: outputs.squeeze(-1).double().cpu() * std + mean,  # back to label units
        metrics=metrics,
    )


def make_head(_label_names: list[str], train_labels: np.ndarray) -> Head:
    """Standardised by the train split's labels (the seam a cache run and the online baselines share)."""
    return regression_head(float(train_labels.mean()), float(train_labels.std()))


def train(
    readers: list[ActivationCache], config: TrainConfig, seed: int, options: TrainOptions
) -> TrainResult:
    result = train_single_cache(readers, config, seed, make_head, options)
    result.metrics.update(mean_baseline(readers[0]))
    if config.probe_baseline:
        result.metrics.update(ridge_probe(readers[0]))
    return result
