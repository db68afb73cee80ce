"""Train UniPT from a cache for classification or regression; the epoch loop itself is train.fit.fit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline.cache import ActivationCache
from pipeline.config import TrainConfig
from pipeline.errors import UniptError
from train.fit import FitResult, Task, fit, pick_device, warmup_cosine  # noqa: F401 (re-exported)
from train.loader import Batch, CacheBatches
from train.metrics import accuracy, macro_f1, pearson, spearman
from train.models import build_model


class BatchSource(Protocol):
    """Batches of one split, like :class:`CacheBatches`: ``len()`` batches per ``epoch(n)``."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int = 0) -> Iterator[Batch]: ...


@dataclass
class TrainResult:
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    layer_weights: list[float] = field(default_factory=list)  # mean confidence per layer on test


def train_classifier(
    reader: ActivationCache,
    config: TrainConfig,
    seed: int,
    progress: bool = True,
    checkpoint: Path | None = None,
    resume: Path | None = None,
    meta: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """UniPT on one cache for ``train.task`` classification or regression (see :func:`fit` for the rest)."""
    if config.task == "retrieval":
        raise UniptError(
            "train.task 'retrieval' needs two caches of one dataset (a query and a gallery backbone); "
            "use a config with two `backbones`"
        )
    _check_labels(reader, config.task)
    torch.manual_seed(seed)
    device = pick_device(config.device)
    model = build_model(config.variant, reader, config).to(device)

    def batches(split: str, shuffle: bool) -> CacheBatches:
        return CacheBatches.for_split(reader, split, config, seed, shuffle)

    train_data, val_data, test_data = batches("train", True), batches("val", False), batches("test", False)
    labels = reader.labels()[train_data.indices]
    return fit_classifier(
        model,
        train_data,
        val_data,
        test_data,
        config,
        len(reader.label_names),
        device,
        progress,
        seed=seed,
        identity={"cache_key": reader.attrs.get("cache_key")},  # where the cache lives may change
        target_stats=(float(labels.mean()), float(labels.std())) if config.task == "regression" else None,
        checkpoint=checkpoint,
        resume=resume,
        meta=meta,
        on_epoch_end=on_epoch_end,
    )


def fit_classifier(
    model: nn.Module,
    train_data: BatchSource,
    val_data: BatchSource,
    test_data: BatchSource,
    config: TrainConfig,
    num_classes: int,
    device: torch.device,
    progress: bool = True,
    *,
    seed: int = 0,
    identity: dict[str, Any] | None = None,
    target_stats: tuple[float, float] | None = None,
    checkpoint: Path | None = None,
    resume: Path | None = None,
    meta: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """The optimisation shared by every way of feeding a classifier (a cache, or a backbone run online).

    ``model(hidden, mask)`` returns ``(logits, layer_weights)``; seed torch before building it. For
    ``config.task == "regression"`` the model has one output, trained with MSE on targets standardised
    by ``target_stats`` (train mean, std), so the loss scale does not depend on the label's units.
    """
    regression = config.task == "regression"
    mean, std = target_stats if target_stats is not None else (0.0, 1.0)
    std = std if std > 0 else 1.0
    cross_entropy = nn.CrossEntropyLoss()

    def loss(batch: Batch, device: torch.device) -> tuple[torch.Tensor, int]:
        logits, _ = model([h.to(device) for h in batch.hidden], batch.mask.to(device))
        if regression:
            target = (batch.labels.to(device, torch.float32) - mean) / std
            return nn.functional.mse_loss(logits.squeeze(-1).float(), target), len(batch.labels)
        return cross_entropy(logits.float(), batch.labels.to(device)), len(batch.labels)

    def run_eval(data: BatchSource) -> dict[str, Any]:
        if regression:
            return evaluate_regression(model, data, device, mean, std)
        return evaluate(model, data, device, num_classes)

    def validate() -> dict[str, float]:
        if not len(val_data):
            return {}
        return {k: v for k, v in run_eval(val_data).items() if k != "layer_weights"}

    task = Task(
        model,
        train_data,
        loss,
        validate,
        "pearson" if regression else "acc",
        identity or {"task": config.task},
    )
    fitted = fit(task, config, seed, device, progress, checkpoint, resume, meta, on_epoch_end)
    test = run_eval(test_data)
    best = fitted.history[fitted.best_epoch - 1]  # its validation metrics were measured with these weights
    names = ("mse", "pearson", "spearman") if regression else ("acc", "f1")
    metrics: dict[str, Any] = {f"val_{n}": best.get(f"val_{n}", float("nan")) for n in names}
    metrics |= {f"test_{n}": test[n] for n in names}
    metrics |= summary_metrics(fitted, config, model)
    return TrainResult(metrics=metrics, history=fitted.history, layer_weights=test["layer_weights"])


def summary_metrics(fitted: FitResult, config: TrainConfig, model: nn.Module) -> dict[str, Any]:
    epochs = len(fitted.history)
    return {
        "best_epoch": fitted.best_epoch,
        "epochs": epochs,
        "stopped_early": fitted.stopped_early,
        "train_seconds": fitted.train_seconds,
        "seconds_per_epoch": fitted.train_seconds / max(1, epochs),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def _check_labels(reader: ActivationCache, task: str) -> None:
    numeric = np.issubdtype(reader.labels().dtype, np.floating)
    if task == "regression" and not numeric:
        raise UniptError(
            f"train.task is 'regression' but cache {reader.source} holds class labels; set train.task: "
            "regression before extracting, so the label column is read as numbers"
        )
    if task == "classification" and numeric:
        raise UniptError(
            f"cache {reader.source} holds numeric (regression) labels; set train.task: regression"
        )


@torch.no_grad()
def evaluate(model: nn.Module, data: BatchSource, device: torch.device, num_classes: int) -> dict:
    model.eval()
    if len(data) == 0:
        return {"acc": float("nan"), "f1": float("nan"), "layer_weights": []}
    predictions, labels, weights = [], [], []
    for batch in data.epoch(0):
        logits, layer_weights = model([h.to(device) for h in batch.hidden], batch.mask.to(device))
        predictions.append(logits.argmax(-1).cpu())
        labels.append(batch.labels)
        weights.append(layer_weights.float().cpu())
    predictions, labels = torch.cat(predictions), torch.cat(labels)
    return {
        "acc": accuracy(predictions, labels),
        "f1": macro_f1(predictions, labels, num_classes),
        "layer_weights": torch.cat(weights).mean(0).tolist(),
    }


@torch.no_grad()
def evaluate_regression(
    model: nn.Module, data: BatchSource, device: torch.device, mean: float = 0.0, std: float = 1.0
) -> dict:
    """MSE in the label's own units, Pearson and Spearman of the predictions against the labels."""
    model.eval()
    if len(data) == 0:
        return {"mse": float("nan"), "pearson": float("nan"), "spearman": float("nan"), "layer_weights": []}
    predictions, labels, weights = [], [], []
    for batch in data.epoch(0):
        outputs, layer_weights = model([h.to(device) for h in batch.hidden], batch.mask.to(device))
        predictions.append(outputs.squeeze(-1).double().cpu() * std + mean)
        labels.append(batch.labels.double())
        weights.append(layer_weights.float().cpu())
    predictions, labels = torch.cat(predictions), torch.cat(labels)
    return {
        "mse": float((predictions - labels).pow(2).mean()),
        "pearson": pearson(predictions, labels),
        "spearman": spearman(predictions, labels),
        "layer_weights": torch.cat(weights).mean(0).tolist(),
    }
