"""Training tasks: one module each (classification, regression, retrieval), found through
:mod:`pipeline.tasks`, where each task declares its label kind, caches, metrics and headline metric.

Every task module has ``train(readers, config, seed, options) -> TrainResult``; :func:`train_task` looks
the config's task up and calls it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.cache import ActivationCache
from pipeline.config import TrainConfig
from pipeline.tasks import TaskInfo, get_task
from train.loop import TrainOptions, TrainResult

__all__ = ["TrainOptions", "TrainResult", "run_task", "train_task"]


def run_task(
    task: TaskInfo, readers: list[ActivationCache], config: TrainConfig, seed: int, options: TrainOptions
) -> TrainResult:
    """Train ``task`` on ``readers`` (as many as the task declares) with ``config``."""
    module, _, function = task.trainer.partition(":")
    trainer = getattr(importlib.import_module(module), function)
    return trainer(readers, config, seed, options)


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
