"""curves.png reads like a plot of epochs: whole-epoch ticks, and a bounded metric over its whole range."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from unipt.train.plots import curves_figure, metric_bounds  # noqa: E402


def _history(values: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "train_loss": 1.0 / (i + 1), "val_acc": v} for i, v in enumerate(values)]


@pytest.mark.parametrize("epochs", [2, 3, 7])
def test_the_epoch_axis_has_whole_epochs_and_accuracy_stays_within_0_and_1(epochs):
    import matplotlib.pyplot as plt

    # Accuracies near 1: matplotlib's own margins would take the axis past 1.0.
    fig = curves_figure(_history([0.97 + 0.01 * (i % 3) for i in range(epochs)]), "val_acc")
    loss_axis, metric_axis = fig.axes
    ticks = [t for t in loss_axis.get_xticks() if loss_axis.get_xlim()[0] <= t <= loss_axis.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert metric_axis.get_ylim() == (0.0, 1.0)
    plt.close(fig)


def test_an_unbounded_metric_keeps_its_own_range():
    import matplotlib.pyplot as plt

    history = [{"epoch": i + 1, "train_loss": 1.0, "val_mse": 40.0 + i} for i in range(3)]
    fig = curves_figure(history, "val_mse")
    low, high = fig.axes[1].get_ylim()
    assert low > 1.0 and high >= 42.0
    assert metric_bounds("test_pearson") == (-1.0, 1.0) and metric_bounds("val_rsum") is None
    plt.close(fig)
