"""What every experiment command shares: reading the config with its flags, and the summary line."""

from __future__ import annotations

import argparse
import json
import math
from typing import TYPE_CHECKING, Any

from unipt.pipeline.log import human_bytes
from unipt.pipeline.tasks import get_task

if TYPE_CHECKING:  # pydantic's models and the recipe load with the commands that use them
    from unipt.pipeline import experiment
    from unipt.pipeline.config import ExperimentConfig


def load_args(args: argparse.Namespace) -> ExperimentConfig:
    """The config file with ``--set`` and the storage flags applied."""
    from unipt.pipeline.config import load_config

    return load_config(args.config, [*(args.set or []), *storage_overrides(args)])


def storage_overrides(args: argparse.Namespace) -> list[str]:
    """``--cache-root``/``--runs-root``/``--registry`` as ``storage.*`` overrides (`plan` and `extract` have
    no run-record flags)."""
    flags = ("cache_root", "runs_root", "registry")
    return [f"storage.{name}={getattr(args, name)}" for name in flags if getattr(args, name, None)]


def _scores(metrics: dict[str, Any], prefix: str, names: tuple[str, ...]) -> str:
    """``acc 0.7910 f1 0.7853``: the named metrics under ``prefix`` that the run has; ``-`` if undefined."""

    def number(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"

    return " ".join(f"{n} {number(metrics[prefix + n])}" for n in names if prefix + n in metrics)


def summary_line(result: experiment.RunResult) -> str:
    """One line per run: the task's summary metrics on test (classification: accuracy and macro-F1) beside
    each baseline's, the same on val with the metric that picked the best epoch, timings, cache, run dir."""
    trained, timings = result.trained, result.timings
    device = trained.runtime.get("device_reason") or trained.runtime.get("device", "?")
    m, task = trained.metrics, get_task(trained.task)
    names = task.summary_metrics
    baselines = [(label, _scores(m, f"{prefix}_test_", names)) for prefix, label in task.baselines]
    shown = ", ".join(f"{label} {scores}" for label, scores in baselines if scores)
    select = trained.select_metric or task.headline
    return (
        f"test {_scores(m, 'test_', names)}{f' ({shown})' if shown else ''} | "
        f"val {_scores(m, 'val_', names)}, best epoch {m.get('best_epoch', '-')} by val_{select} | "
        f"extract {timings.extract_s:.1f}s ({'cache hit' if result.cache_hit else 'cache miss'}) | "
        f"train {m['train_seconds']:.1f}s ({m['seconds_per_epoch']:.1f}s/epoch) on {device} | "
        f"cache {human_bytes(trained.cache_bytes)} | run {result.run_dir}"
        + "".join(f" | WARNING: {warning}" for warning in trained.warnings)
    )


def print_summary(result: experiment.RunResult) -> None:
    print(summary_line(result), flush=True)


def show_value(value: Any) -> str:
    """A value in one line for people: text as it is, anything else as compact JSON."""
    return json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value


def print_json(value: Any) -> None:
    """``--json`` output: strict JSON on stdout (NaN and infinities as null), nothing else there."""
    from unipt.pipeline.runs.records import without_nan

    print(json.dumps(without_nan(value), indent=2, sort_keys=True, default=str, allow_nan=False), flush=True)
