"""The task registry: what every stage must know about a training task, declared once per task.

A task says what its label column holds (``categorical`` class names or ``numeric`` values), how many
caches of one dataset it trains on, which metrics it reports for each split and which one is its
*headline*: the metric that picks the best epoch, sorts a sweep, labels the plots and leads the summary
line. Config validation, dataset label parsing, the sweep table, the plots, ``runs ls`` and the run
record read it from here. How the task trains lives in its own module under ``train/tasks/``, named
here by import path, so this module stays light (the extraction driver imports it, never ``train/``).

Adding a task: write ``train/tasks/<name>.py`` with a ``train(readers, config, seed, options)``
function, then add one :func:`register_task` line at the bottom of this file. A task that trains one
model with one head also names its ``make_head(label_names, train_labels)`` (``head``): the baselines
with the backbone in memory (:mod:`benchmarks.online_baselines`) feed that same head, so they train the
task too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from unipt.pipeline.errors import UniptError

LabelKind = Literal["categorical", "numeric"]


@dataclass(frozen=True)
class TaskInfo:
    name: str
    label_kind: LabelKind  # what dataset loading makes of the label column
    caches: int  # caches of one dataset it trains on (retrieval: a query and a gallery backbone's)
    metrics: tuple[str, ...]  # reported as val_<name> and test_<name>
    headline: str  # one of ``metrics``; higher is better
    trainer: str  # "module:function" under train/tasks/, imported only when training
    description: str = ""
    summary: tuple[str, ...] = ()  # metrics on the summary line (default: the headline)
    # Baselines fitted in the same run: (metric prefix, what to call it), e.g. ("probe", "linear probe")
    # reports probe_val_<metric> and probe_test_<metric>.
    baselines: tuple[tuple[str, str], ...] = ()
    # The metric that picks the best epoch when one class holds more than IMBALANCE_SHARE of train (with
    # train.select_metric: auto): accuracy rewards predicting the majority class there.
    imbalanced_select: str | None = None
    # "module:function" giving the head of a one-model task from (label names, train labels); None for a
    # task that is not one model with one head (retrieval): it has no backbone-in-memory baseline.
    head: str | None = None

    def __post_init__(self) -> None:
        for name in (
            self.headline,
            *self.summary,
            *([self.imbalanced_select] if self.imbalanced_select else []),
        ):
            if name not in self.metrics:
                raise ValueError(f"task {self.name}: metric {name!r} is not one of {self.metrics}")

    @property
    def summary_metrics(self) -> tuple[str, ...]:
        return self.summary or (self.headline,)

    @property
    def val_metric(self) -> str:
        return f"val_{self.headline}"

    @property
    def test_metric(self) -> str:
        return f"test_{self.headline}"


_TASKS: dict[str, TaskInfo] = {}


def register_task(info: TaskInfo) -> TaskInfo:
    if info.name in _TASKS:
        raise ValueError(f"task {info.name!r} is registered twice")
    _TASKS[info.name] = info
    return info


def task_names() -> tuple[str, ...]:
    return tuple(_TASKS)


def get_task(name: str) -> TaskInfo:
    try:
        return _TASKS[name]
    except KeyError:
        raise UniptError(f"unknown train.task {name!r}; choose one of {', '.join(_TASKS)}") from None


IMBALANCE_SHARE = 0.6


def select_metric(info: TaskInfo, setting: str, largest_class_share: float | None) -> tuple[str, str]:
    """(the metric that picks the best epoch, why): ``train.select_metric``, or with ``auto`` the
    headline, unless the largest class of train holds more than IMBALANCE_SHARE of it."""
    if setting != "auto":
        return setting, "train.select_metric"
    share = largest_class_share
    if info.imbalanced_select and share is not None and share > IMBALANCE_SHARE:
        return info.imbalanced_select, (
            f"auto: the largest class is {share:.0%} of train, above {IMBALANCE_SHARE:.0%}"
        )
    if share is not None and info.imbalanced_select:
        return (
            info.headline,
            f"auto: the largest class is {share:.0%} of train, at most {IMBALANCE_SHARE:.0%}",
        )
    return info.headline, "auto: the task's headline metric"


def headline_of(metrics: dict[str, object]) -> str | None:
    """The headline metric's base name for a run's metrics (old records carry no task name)."""
    for info in _TASKS.values():
        if info.test_metric in metrics:
            return info.headline
    return None


register_task(
    TaskInfo(
        "classification",
        "categorical",
        1,
        ("acc", "f1"),
        "acc",
        "unipt.train.tasks.classification:train",
        "accuracy and macro-F1; a linear probe on the last layer and the majority class are the baselines",
        summary=("acc", "f1"),
        baselines=(("probe", "linear probe"), ("majority", "majority class")),
        imbalanced_select="f1",
        head="unipt.train.tasks.classification:make_head",
    )
)
register_task(
    TaskInfo(
        "regression",
        "numeric",
        1,
        ("mse", "pearson", "spearman"),
        "pearson",
        "unipt.train.tasks.regression:train",
        "a numeric label column; MSE loss on standardised targets; Pearson and Spearman; a ridge probe on "
        "the last layer and the train mean are the baselines",
        summary=("pearson", "mse"),
        baselines=(("probe", "ridge probe"), ("mean", "mean predictor")),
        head="unipt.train.tasks.regression:make_head",
    )
)
register_task(
    TaskInfo(
        "retrieval",
        "categorical",
        2,
        ("q2g_r1", "q2g_r5", "q2g_r10", "g2q_r1", "g2q_r5", "g2q_r10", "rsum"),
        "rsum",
        "unipt.train.tasks.retrieval:train",
        "two backbones' caches of one dataset (query, gallery); InfoNCE; R@1/5/10 and rSum",
    )
)
