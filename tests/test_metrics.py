"""Regression metrics against values worked out by hand (no scipy in the dependencies)."""

from __future__ import annotations

import math

import pytest
import torch

from unipt.train.metrics import average_ranks, pearson, spearman


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_pearson_by_hand():
    # Deviations (-2,-1,0,1,2) and (-1,-2,1,0,2): sum of products 8, both norms sqrt(10) -> 0.8.
    assert pearson(t([1, 2, 3, 4, 5]), t([2, 1, 4, 3, 5])) == pytest.approx(0.8)
    # y = x^2 on 1..4: deviations (-1.5,-.5,.5,1.5) and (-6.5,-3.5,1.5,8.5): 25 / sqrt(5 * 129).
    assert pearson(t([1, 2, 3, 4]), t([1, 4, 9, 16])) == pytest.approx(25 / math.sqrt(645))
    assert pearson(t([3, 2, 1]), t([1, 2, 3])) == pytest.approx(-1.0)
    assert math.isnan(pearson(t([1, 1, 1]), t([1, 2, 3])))  # a constant side has no correlation
    assert math.isnan(pearson(t([1]), t([2])))


def test_spearman_by_hand_with_ties():
    assert spearman(t([1, 2, 3, 4]), t([1, 4, 9, 16])) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(t([1, 2, 3, 4, 5]), t([2, 1, 4, 3, 5])) == pytest.approx(0.8)
    # Tied values share the mean rank: x ranks (1, 2.5, 2.5, 4); with y ranks (1, 3, 2, 4) the
    # deviations give 4.5 / sqrt(4.5 * 5) = sqrt(0.9).
    assert average_ranks(t([1, 2, 2, 3])).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks(t([30, 10, 20, 10])).tolist() == [4.0, 1.5, 3.0, 1.5]
    assert spearman(t([1, 2, 2, 3]), t([1, 3, 2, 4])) == pytest.approx(math.sqrt(0.9))


def test_collapse_warnings_name_a_model_that_predicts_one_class():
    from unipt.train.metrics import class_report, collapse_warnings

    labels = torch.tensor([0, 1, 2, 0, 0, 1])
    collapsed = torch.zeros(6, dtype=torch.long)
    report = {"val": class_report(collapsed, labels, ["a", "b", "c"])}
    metrics = {"val_acc": 0.5, "majority_val_acc": 0.5}
    (warning,) = collapse_warnings(metrics, report, "acc")
    assert "predicts one class (a) for every val example" in warning and "train.epochs" in warning


def test_collapse_warnings_name_a_selected_metric_at_the_majority_baseline():
    from unipt.train.metrics import class_report, collapse_warnings

    labels = torch.tensor([0, 1, 2, 0, 0, 1])
    mixed = torch.tensor([0, 0, 2, 0, 1, 0])  # three classes predicted, no better than the majority
    report = {"val": class_report(mixed, labels, ["a", "b", "c"])}
    (warning,) = collapse_warnings({"val_acc": 0.5, "majority_val_acc": 0.5}, report, "acc")
    assert "is the majority class's" in warning
    assert collapse_warnings({"val_acc": 0.6, "majority_val_acc": 0.5}, report, "acc") != []  # within 1/6
    # One example of six above the baseline is 1/6: more than noise here, so no warning.
    assert collapse_warnings({"val_acc": 0.8, "majority_val_acc": 0.5}, report, "acc") == []


def test_collapse_warnings_name_constant_regression_predictions():
    from unipt.train.metrics import collapse_warnings, pearson

    constant = pearson(torch.ones(5), torch.arange(5.0))
    (warning,) = collapse_warnings(
        {"val_mse": 1.0, "val_pearson": constant, "test_mse": 1.0}, None, "pearson"
    )
    assert "same value for every val example" in warning
    assert (
        collapse_warnings(
            {"val_mse": 1.0, "val_pearson": 0.4, "test_pearson": 0.3, "test_mse": 1.0}, None, "pearson"
        )
        == []
    )
