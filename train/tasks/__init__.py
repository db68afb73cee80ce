"""Training tasks: one module each (classification, regression, retrieval), found through
:mod:`unipt.pipeline.tasks`, where each task declares its label kind, caches, metrics and headline metric.

Every task module has ``train(readers, config, seed, options) -> TrainResult``; :func:`train_task` looks
the config's task up and calls it. A one-model task's module also has ``make_head(label_names,
train_labels) -> Head`` (named by the registry's ``head``); :func:`task_head` gives it to code that feeds
the head some other way (the baselines with the backbone in memory).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.config import TrainConfig
from unipt.pipeline.errors import UniptError
from unipt.pipeline.tasks import TaskInfo, get_task
from unipt.train.loop import Head, TrainOptions, TrainResult

__all__ = ["TrainOptions", "TrainResult", "run_task", "task_head", "train_task"]


def _load(target: str) -> Callable[..., Any]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def run_task(
    task: TaskInfo, readers: list[ActivationCache], config: TrainConfig, seed: int, options: TrainOptions
) -> TrainResult:
    """Train ``task`` on ``readers`` (as many as the task declares) with ``config``."""
    return _load(task.trainer)(readers, config, seed, options)


def task_head(task: TaskInfo, label_names: list[str], train_labels: np.ndarray) -> Head:
    """The head ``task`` trains one model with, for a dataset's label names and train split's labels."""
    if task.head is None:
        raise UniptError(
            f"train.task {task.name!r} is not one model with one head; train it from its caches (unipt run)"
        )
    return _load(task.head)(label_names, train_labels)


def train_task(
    readers: ActivationCache | list[ActivationCache],
    config: TrainConfig,
    seed: int,
    progress: bool = True,
    checkpoint: Path | None = None,
    resume: Path | None = None,
    meta: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """``config.task`` on one cache (or a list, for two-cache tasks); the Python shortcut of the recipe's
    training step for code that already holds open caches."""
    readers = readers if isinstance(readers, list) else [readers]
    options = TrainOptions(progress, checkpoint, resume, meta, on_epoch_end)
    return run_task(get_task(config.task), readers, config, seed, options)
