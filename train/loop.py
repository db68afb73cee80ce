"""Single-cache training: a model over one cache's layers, a task's head, and the shared epoch loop.

A task that trains one model on one cache (classification, regression) supplies a :class:`Head`: how
many outputs the model has, its loss, and how its outputs become metrics. :func:`train_single_cache`
builds the UniPT variant, the batches and the :class:`unipt.train.fit.Task`; :func:`fit_head` is the part
shared with the backbone-in-memory baselines, which feed the same heads from a live backbone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.config import TrainConfig
from unipt.pipeline.errors import UniptError
from unipt.pipeline.log import say
from unipt.pipeline.tasks import get_task, select_metric
from unipt.train.fit import (
    EpochData,
    FitResult,
    Task,
    TrainOptions,
    amp_dtype,
    fit,
    pick_device,
    precision,
)
from unipt.train.loader import Batch, CacheBatches, to_device
from unipt.train.methods import build_model
from unipt.train.prefetch import Moved, OnDevice, host_to_device


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    layer_weights: list[float] = field(default_factory=list)  # mean confidence per layer on test
    gallery_layer_weights: list[float] | None = None  # two-cache tasks: the second side's
    model: nn.Module | None = None  # holding the best epoch's weights
    select_metric: str | None = None  # the validation metric that picked the best epoch
    # Per-split details a task reports beyond its metrics (classification: per-class scores, confusion).
    report: dict[str, Any] | None = None
    amp: str = "off"  # the autocast dtype training and evaluation ran in (FitResult.amp)


@dataclass
class Head:
    """What a single-cache task puts on top of the model's outputs."""

    outputs: int  # the model's output width
    loss: Callable[[Tensor, Tensor], Tensor]  # (outputs [B, outputs] float32, labels [B] on device)
    collect: Callable[[Tensor], Tensor]  # one batch's outputs -> what the metrics need, on the CPU
    metrics: Callable[[Tensor, Tensor], dict[str, float]]  # (all collected, all labels) -> the task's metrics
    report: Callable[[Tensor, Tensor], dict[str, Any]] | None = None  # per-class details, if the task has any


def train_single_cache(
    readers: list[ActivationCache],
    config: TrainConfig,
    seed: int,
    make_head: Callable[[list[str], np.ndarray], Head],
    options: TrainOptions,
) -> TrainResult:
    """The config's UniPT variant on every layer of the one cache in ``readers``, checked to hold the
    labels the task declares; ``make_head(label_names, train_labels)`` gives the task's head (a
    regression head standardises targets with the train split's statistics)."""
    if len(readers) != 1:
        raise UniptError(f"train.task {config.task!r} trains on one cache, got {len(readers)}")
    (reader,) = readers
    _check_label_kind(reader, config.task)
    torch.manual_seed(seed)
    device = pick_device(config.device)
    splits = [CacheBatches.for_split(reader, s, config, seed, shuffle=s == "train") for s in ("train", "val")]
    splits.append(CacheBatches.for_split(reader, "test", config, seed, shuffle=False))
    train_labels = reader.labels()[splits[0].indices]
    head = make_head(list(reader.label_names), train_labels)
    model = build_model(reader, config, num_outputs=head.outputs).to(device)
    identity = {"cache_key": reader.meta.cache_key}  # where the cache lives may change
    select = selection(config, train_labels)
    return fit_head(
        model, *splits, config, head, device, options, seed=seed, identity=identity, select=select
    )


def selection(config: TrainConfig, train_labels: np.ndarray) -> tuple[str, str]:
    """(the validation metric that picks the best epoch, why), from ``train.select_metric`` and, with
    ``auto``, the train split's class balance: one rule for every way of feeding a head."""
    share = largest_share(config.task, train_labels)
    return select_metric(get_task(config.task), config.select_metric, share)


def largest_share(task: str, train_labels: np.ndarray) -> float | None:
    """The largest class's share of the train split (None for numeric labels)."""
    if get_task(task).label_kind != "categorical" or not len(train_labels):
        return None
    return float(np.bincount(train_labels.astype(np.int64)).max() / len(train_labels))


def fit_head(
    model: nn.Module,
    train_data: EpochData,
    val_data: EpochData,
    test_data: EpochData,
    config: TrainConfig,
    head: Head,
    device: torch.device,
    options: TrainOptions,
    *,
    seed: int = 0,
    identity: dict[str, Any] | None = None,
    select: tuple[str, str] | None = None,
) -> TrainResult:
    """The optimisation shared by every way of feeding a head (a cache, or a backbone run online).

    ``model(hidden, mask)`` returns ``(outputs, layer_weights)``; seed torch before building it. The
    metric names are the task's (:mod:`unipt.pipeline.tasks`); ``select`` is (the validation metric that picks
    the best epoch, why), by default ``train.select_metric`` or the task's headline.
    """
    info = get_task(config.task)
    score, why = select or select_metric(info, config.select_metric, None)
    say(f"best epoch chosen by val_{score} ({why})")

    amp = amp_dtype(config.amp, device)  # what fit() trains in; every evaluation runs in it too

    def loss(moved: Moved, device: torch.device) -> tuple[Tensor, int]:
        hidden, mask, labels = moved
        outputs, _ = model(hidden, mask)
        return head.loss(outputs.float(), labels), len(labels)

    def validate() -> dict[str, float]:
        if not len(val_data):
            return {}
        scores = evaluate(model, val_data, device, head, info.metrics, amp)
        return {k: v for k, v in scores.items() if k != "layer_weights"}

    on_device = OnDevice.for_device(
        train_data, lambda batch: batch_to_device(batch, device, model, amp), device
    )
    task = Task(model, on_device, loss, validate, score, identity or {"task": config.task})
    fitted = fit(task, config, seed, device, options)
    test = evaluate(model, test_data, device, head, info.metrics, amp)
    report = None
    if head.report is not None:
        val = evaluate(model, val_data, device, head, info.metrics, amp) if len(val_data) else {}
        report = {
            split: scores["report"] for split, scores in (("val", val), ("test", test)) if "report" in scores
        }
    return TrainResult(
        metrics=final_metrics(fitted, test, info.metrics, config, model),
        history=fitted.history,
        layer_weights=test["layer_weights"],
        model=model,
        select_metric=score,
        report=report,
        amp=fitted.amp,
    )


def final_metrics(
    fitted: FitResult, test: dict[str, Any], names: tuple[str, ...], config: TrainConfig, model: nn.Module
) -> dict[str, Any]:
    """val_* of the best epoch (measured with the weights the model now holds), test_*, and the run's
    shape: best epoch, epochs, early stop, seconds, trainable parameters."""
    best = fitted.history[fitted.best_epoch - 1]
    metrics: dict[str, Any] = {f"val_{n}": best.get(f"val_{n}", math.nan) for n in names}
    metrics |= {f"test_{n}": test[n] for n in names}
    epochs = len(fitted.history)
    return metrics | {
        "best_epoch": fitted.best_epoch,
        "epochs": epochs,
        "stopped_early": fitted.stopped_early,
        "train_seconds": fitted.train_seconds,
        "seconds_per_epoch": fitted.train_seconds / max(1, epochs),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def batch_to_device(batch: Batch, device: torch.device, model: nn.Module, amp: torch.dtype | None) -> Moved:
    """(hidden states, mask, labels) on ``device``: rows cast straight to the autocast dtype (autocast
    would cast fp32 rows back down), labels pinned and copied without blocking the host."""
    hidden, mask = to_device(batch, device, model, dtype=amp or torch.float32)
    return hidden, mask, host_to_device(batch.labels, device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: EpochData,
    device: torch.device,
    head: Head,
    names: tuple[str, ...],
    amp: torch.dtype | None = None,
) -> dict[str, Any]:
    """The head's metrics (``names``) over a whole split, and the model's mean per-layer weights on it,
    computed under ``amp`` (the autocast dtype training used, or None for full precision)."""
    model.eval()
    if len(data) == 0:
        return {**dict.fromkeys(names, math.nan), "layer_weights": []}
    collected, labels, weights = [], [], []
    for batch in data.epoch(0):
        with precision(device, amp):
            outputs, layer_weights = model(*to_device(batch, device, model, dtype=amp or torch.float32))
        collected.append(head.collect(outputs))
        labels.append(batch.labels)
        weights.append(layer_weights.float().cpu())
    outputs, targets = torch.cat(collected), torch.cat(labels)
    report = {"report": head.report(outputs, targets)} if head.report is not None else {}
    return {**head.metrics(outputs, targets), "layer_weights": torch.cat(weights).mean(0).tolist(), **report}


def _check_label_kind(reader: ActivationCache, task: str) -> None:
    """Refuse a cache whose labels are not what the task declares (class ids vs numbers)."""
    numeric = bool(np.issubdtype(reader.labels().dtype, np.floating))
    if get_task(task).label_kind == "numeric" and not numeric:
        raise UniptError(
            f"train.task is {task!r} but cache {reader.source} holds class labels; set train.task: "
            f"{task} before extracting, so the label column is read as numbers"
        )
    if numeric and get_task(task).label_kind != "numeric":
        raise UniptError(
            f"cache {reader.source} holds numeric (regression) labels; set train.task: regression"
        )
