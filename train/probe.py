"""The linear-probe baseline: logistic regression on the last layer's mean-pooled cached tokens (or the
last stage's mean-pooled map, for a CNN cache)."""

from __future__ import annotations

import torch

from pipeline.cache import ActivationCache
from train.loader import CacheBatches
from train.metrics import accuracy
from train.unipt import masked_mean

_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


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


def linear_probe(reader: ActivationCache, seed: int = 0) -> dict[str, float]:
    """Fit on train for each L2 strength, keep the best on val, report val and test accuracy."""
    torch.manual_seed(seed)
    layer = reader.layers[-1]
    x_train, y_train = pooled_features(reader, "train", layer)
    x_val, y_val = pooled_features(reader, "val", layer)
    x_test, y_test = pooled_features(reader, "test", layer)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_val, x_test = ((x - mean) / std for x in (x_train, x_val, x_test))
    num_classes = len(reader.label_names)

    best = None
    for l2 in _L2_GRID:
        weight = _fit_logistic(x_train, y_train, num_classes, l2)
        val_acc = accuracy(_predict(weight, x_val), y_val)
        if best is None or val_acc > best[0]:
            best = (val_acc, l2, weight)
    val_acc, l2, weight = best
    return {
        "probe_val_acc": val_acc,
        "probe_test_acc": accuracy(_predict(weight, x_test), y_test),
        "probe_l2": l2,
    }


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
