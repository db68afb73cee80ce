"""The two pictures saved beside a run record: learning curves and UniPT's per-layer weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

CURVES_FILE = "curves.png"
LAYER_WEIGHTS_FILE = "layer_weights.png"
CONFUSION_FILE = "confusion.png"

# The range a metric can take, by its base name (``val_acc`` -> ``acc``): its axis shows the whole range,
# so 0.9 never looks like a plateau near the top of a 0.88-0.91 axis, and never runs past 1.0. Metrics not
# named here (mse, rsum, R@K in percent) are unbounded or scaled otherwise and keep matplotlib's range.
BOUNDED_METRICS = {"acc": (0.0, 1.0), "f1": (0.0, 1.0), "pearson": (-1.0, 1.0), "spearman": (-1.0, 1.0)}


def metric_bounds(metric: str) -> tuple[float, float] | None:
    """The range of ``metric`` (``val_acc``, ``test_f1`` or a base name), or None for an unbounded one."""
    for split in ("train_", "val_", "test_"):
        metric = metric.removeprefix(split)
    return BOUNDED_METRICS.get(metric)


def curves_figure(history: list[dict[str, Any]], metric: str | None = None) -> Any:
    """The figure of ``curves.png``: train loss per epoch and, on a second axis, ``metric`` (whole epochs
    on the x axis; a bounded metric over its whole range)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    if metric is not None and not any(_finite(h.get(metric)) for h in history):
        metric = None  # no validation split: draw the loss alone

    fig, loss_axis = plt.subplots(figsize=(6, 4), dpi=100)
    loss_axis.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:blue", label="train loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.5 tick
    loss_axis.set_ylabel("train loss", color="tab:blue")
    if metric is not None:
        metric_axis = loss_axis.twinx()
        values = [h.get(metric, math.nan) for h in history]
        metric_axis.plot(epochs, values, "s-", color="tab:orange", label=metric)
        metric_axis.set_ylabel(metric.replace("_", " "), color="tab:orange")
        bounds = metric_bounds(metric)
        if bounds is not None:
            metric_axis.set_ylim(*bounds)
    loss_axis.set_title("training curves" if metric else "training curves (no validation split)")
    fig.tight_layout()
    return fig


def write_run_plots(
    run_dir: str | Path,
    history: list[dict[str, Any]],
    layer_weights: list[float],
    layer_names: list[str],
    metric: str | None = None,
) -> list[Path]:
    """Save ``curves.png`` (train loss and ``metric``, the task's validation headline metric, per epoch)
    and ``layer_weights.png``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    fig = curves_figure(history, metric)
    curves = run_dir / CURVES_FILE
    fig.savefig(curves, format="png")
    plt.close(fig)

    fig, axis = plt.subplots(figsize=(6, 4), dpi=100)
    axis.bar(range(len(layer_weights)), layer_weights, color="tab:green")
    if len(layer_names) != len(layer_weights):
        layer_names = [f"#{i}" for i in range(len(layer_weights))]
    axis.set_xticks(range(len(layer_weights)), layer_names)
    axis.set_xlabel("hidden state (the anchor, the last layer, is not weighted)")
    axis.set_ylabel("mean confidence weight (test)")
    axis.set_title("UniPT layer weights")
    fig.tight_layout()
    weights = run_dir / LAYER_WEIGHTS_FILE
    fig.savefig(weights, format="png")
    plt.close(fig)
    return [curves, weights]


def write_report_plots(run_dir: str | Path, report: dict[str, Any] | None) -> list[Path]:
    """``confusion.png`` when the run's report has a test confusion matrix (classification): counts, with
    each true class's row shaded by its recall, so a model that predicts only the majority class shows."""
    test = (report or {}).get("test") or {}
    if "confusion" not in test:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(test["confusion"], dtype=np.int64)
    names = list(test.get("labels") or range(len(counts)))
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(names) + 2)
    fig, axis = plt.subplots(figsize=(size + 1, size), dpi=100)
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 30:  # beyond that the numbers are unreadable; the shading still shows
        for (row, col), n in np.ndenumerate(counts):
            axis.text(
                col,
                row,
                str(n),
                ha="center",
                va="center",
                color="white" if shares[row, col] > 0.5 else "black",
            )
    axis.set_xticks(range(len(names)), [str(n) for n in names], rotation=45, ha="right")
    axis.set_yticks(range(len(names)), [str(n) for n in names])
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title("test confusion matrix (shade: share of the true class)")
    fig.colorbar(image, ax=axis, fraction=0.046)
    fig.tight_layout()
    path = Path(run_dir) / CONFUSION_FILE
    fig.savefig(path, format="png")
    plt.close(fig)
    return [path]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
