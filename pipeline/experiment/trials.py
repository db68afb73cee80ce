"""A sweep's trials: the grid's points (each a full config), the sampled settings on top of them, and what
each trial gave (:mod:`unipt.pipeline.experiment.sweep` runs them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from unipt.pipeline.config import ExperimentConfig, TrainConfig

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


@dataclass
class Trial:
    params: dict[str, Any]  # the swept settings, e.g. {"train.lr": 0.001}
    config: ExperimentConfig


@dataclass(frozen=True)
class Distribution:
    """One sampled ``train.*`` setting: ``uniform``/``loguniform`` (low, high), ``randint`` (low, high,
    high exclusive) or ``choice`` (the values)."""

    kind: str
    args: tuple[Any, ...]

    def tune(self) -> Any:
        from ray import tune

        return {
            "uniform": tune.uniform,
            "loguniform": tune.loguniform,
            "randint": tune.randint,
            "choice": lambda *values: tune.choice(list(values)),
        }[self.kind](*self.args)


@dataclass
class Search:
    """Sampled settings on top of the grid: ``samples`` draws per grid point, ``random`` or ``optuna``."""

    distributions: dict[str, Distribution] = field(default_factory=dict)
    samples: int = 1
    algorithm: Literal["random", "optuna"] = "random"


@dataclass
class TrialResult:
    index: int  # position in the sweep's trial list (Tune's trial order)
    params: dict[str, Any]
    run_id: str | None  # the registered run; None for a stopped or failed trial
    metrics: dict[str, Any]  # a finished trial's run metrics; else its last reported epoch's
    status: str = "finished"  # finished, stopped (ASHA), failed
    epochs: int = 0  # epochs reported
    resources: dict[str, float] = field(default_factory=dict)  # what the trial asked Ray for
    error: str | None = None  # a failed trial's cause, one line


def describe(params: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in params.items())


def trial_config(trial: Trial, sampled: dict[str, Any]) -> ExperimentConfig:
    """The trial's config with the sampled ``train.*`` values, validated like any config."""
    if not sampled:
        return trial.config
    train = {**trial.config.train.model_dump(), **{k.partition(".")[2]: v for k, v in sampled.items()}}
    return trial.config.model_copy(update={"train": TrainConfig.model_validate(train)})
