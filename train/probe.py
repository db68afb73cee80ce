"""Baselines fitted beside UniPT in every run, on the last layer's mean-pooled cached tokens (or the last
stage's mean-pooled map, for a CNN cache): a linear probe (logistic regression) and the majority class
for classification; a ridge probe and the train mean for regression. Each reports
``<prefix>_val_<metric>`` and ``<prefix>_test_<metric>`` for the task's metrics."""

from __future__ import annotations

import torch

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.train.loader import CacheBatches
from unipt.train.methods.unipt.transformer import masked_mean
from unipt.train.metrics import accuracy, macro_f1, pearson, spearman

_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
_RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # times the number of training examples


def pooled_features(reader: ActivationCache, split: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = [], []
    for batch in CacheBatches(reader, split, [layer], batch_size=512).epoch(0):
        hidden = batch.hidden[0]
        # Feature-map caches give [B, C, H, W] stage maps: the probe pools over positions, like CNN heads do.
        features.append(hidden.flatten(2).mean(-1) if hidden.dim() == 4 else masked_mean(hidden, batch.mask))
        labels.append(batch.labels)
    if not features:  # an empty split: no batches, and accuracy on it is NaN
        return torch.zeros(0, reader.hidden_sizes[layer]), torch.zeros(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


def _standardised_splits(reader: ActivationCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(features, labels) of train, val and test, features standardised with train's statistics."""
    layer = reader.layers[-1]
    splits = [pooled_features(reader, split, layer) for split in ("train", "val", "test")]
    mean, std = splits[0][0].mean(0), splits[0][0].std(0).clamp_min(1e-6)
    return [((x - mean) / std, y) for x, y in splits]


def _classification_scores(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"acc": accuracy(predictions, labels), "f1": macro_f1(predictions, labels)}


def linear_probe(reader: ActivationCache, seed: int = 0, select: str = "acc") -> dict[str, float]:
    """Fit on train for each L2 strength, keep the best by val ``select`` (the metric that picks UniPT's
    best epoch), report val and test accuracy and macro-F1."""
    torch.manual_seed(seed)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = _standardised_splits(reader)
    num_classes = len(reader.label_names)

    best = None
    for l2 in _L2_GRID:
        weight = _fit_logistic(x_train, y_train, num_classes, l2)
        val = _classification_scores(_predict(weight, x_val), y_val)
        if best is None or val[select] > best[0][select]:
            best = (val, l2, weight)
    val, l2, weight = best
    test = _classification_scores(_predict(weight, x_test), y_test)
    return {
        **{f"probe_val_{k}": v for k, v in val.items()},
        **{f"probe_test_{k}": v for k, v in test.items()},
        "probe_l2": l2,
    }


def majority_baseline(reader: ActivationCache) -> dict[str, float]:
    """Always predict train's most frequent class: the accuracy any model must beat on imbalanced data."""
    labels, splits = reader.labels(), reader.examples.column("split").to_pylist()
    by_split = {
        s: torch.as_tensor(labels[[i for i, x in enumerate(splits) if x == s]])
        for s in ("train", "val", "test")
    }
    majority = int(torch.bincount(by_split["train"].long()).argmax())
    metrics: dict[str, float] = {}
    for split in ("val", "test"):
        y = by_split[split].long()
        scores = _classification_scores(torch.full_like(y, majority), y)
        metrics |= {f"majority_{split}_{k}": v for k, v in scores.items()}
    return metrics | {"majority_class": majority}


def _regression_scores(predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    targets = targets.double()
    return {
        "mse": float((predictions - targets).pow(2).mean()),
        "pearson": pearson(predictions, targets),
        "spearman": spearman(predictions, targets),
    }


def ridge_probe(reader: ActivationCache) -> dict[str, float]:
    """Ridge regression (closed form, float64) for each L2 strength; the best by val MSE (never undefined,
    unlike a correlation) is reported on val and test with the regression metrics."""
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        (torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1), y.double())
        for x, y in _standardised_splits(reader)
    )
    n = len(x_train)
    best = None
    for l2 in _RIDGE_GRID:
        penalty = l2 * n * torch.eye(x_train.shape[1], dtype=torch.float64)
        penalty[-1, -1] = 0.0  # the intercept is not shrunk
        weight = torch.linalg.solve(x_train.T @ x_train + penalty, x_train.T @ y_train)
        val = _regression_scores(x_val @ weight, y_val)
        if best is None or val["mse"] < best[0]["mse"]:
            best = (val, l2, weight)
    val, l2, weight = best
    test = _regression_scores(x_test @ weight, y_test)
    return {
        **{f"probe_val_{k}": v for k, v in val.items()},
        **{f"probe_test_{k}": v for k, v in test.items()},
        "probe_l2": l2,
    }


def mean_baseline(reader: ActivationCache) -> dict[str, float]:
    """Always predict train's mean label: the MSE any model must beat (a constant has no correlation, so
    only MSE is reported)."""
    labels, splits = reader.labels(), reader.examples.column("split").to_pylist()
    mean = float(labels[[i for i, x in enumerate(splits) if x == "train"]].mean())
    metrics: dict[str, float] = {}
    for split in ("val", "test"):
        y = torch.as_tensor(labels[[i for i, x in enumerate(splits) if x == split]], dtype=torch.float64)
        metrics[f"mean_{split}_mse"] = float((y - mean).pow(2).mean())
    return metrics | {"mean_prediction": mean}


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float) -> torch.Tensor:
    weight = torch.zeros(x.shape[1] + 1, num_classes, requires_grad=True)
    inputs = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(inputs @ weight, y) + l2 * weight[:-1].pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach()


def _predict(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(len(x), 1)], dim=1) @ weight).argmax(-1)
