"""Training tasks: one module each (classification, regression, retrieval), found through
:mod:`unipt.pipeline.tasks`, where each task declares its label kind, caches, metrics and headline metric.

Every task module has ``train(readers, config, seed, options) -> TrainResult``: :func:`task_trainer` gives
it to the recipe, which calls it itself; :func:`train_task` looks the config's task up and calls it. A
one-model task's module also has ``make_head(label_names, train_labels) -> Head`` (named by the
registry's ``head``); :func:`task_head` gives it to code that feeds the head some other way (the baselines
with the backbone in memory).
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
from unipt.train.checkpoint import resume_point
from unipt.train.fit import TrainOptions
from unipt.train.loop import Head, TrainResult

__all__ = ["TrainOptions", "TrainResult", "task_head", "task_trainer", "train_task"]

# A task module's ``train``: (readers, config, seed, options) -> what it trained.
Trainer = Callable[[list[ActivationCache], TrainConfig, int, TrainOptions], TrainResult]


def _load(target: str) -> Callable[..., Any]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def task_trainer(task: TaskInfo) -> Trainer:
    """``task``'s ``train`` function (the registry's ``trainer``): call it on the caches it declares."""
    return _load(task.trainer)


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
    training step for code that already holds open caches. ``resume``: a checkpoint file or its run
    directory."""
    readers = readers if isinstance(readers, list) else [readers]
    point = resume_point(resume) if resume is not None else None
    options = TrainOptions(progress, checkpoint, point, meta, on_epoch_end)
    return task_trainer(get_task(config.task))(readers, config, seed, options)
