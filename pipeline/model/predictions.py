"""What a tuned model predicts, one row per input (labels and class probabilities, or regression
values), and how its metrics and classification report print for people."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Predictions:
    """One row per input, in input order."""

    example_ids: list[str]
    outputs: np.ndarray  # the model's raw outputs: logits [N, classes], or [N] regression values
    label_names: list[str]
    task: str

    @property
    def probabilities(self) -> np.ndarray | None:
        """[N, classes] softmax of the logits; None for regression."""
        if self.task == "regression":
            return None
        shifted = self.outputs - self.outputs.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)

    @property
    def labels(self) -> list[str] | None:
        if self.task == "regression":
            return None
        return [self.label_names[i] for i in self.outputs.argmax(axis=1)]

    @property
    def values(self) -> np.ndarray | None:
        return self.outputs if self.task == "regression" else None

    def rows(self) -> list[dict[str, Any]]:
        if self.task == "regression":
            return [
                {"example_id": i, "value": float(v)}
                for i, v in zip(self.example_ids, self.outputs, strict=True)
            ]
        probs, labels = self.probabilities, self.labels
        assert probs is not None and labels is not None
        return [
            {
                "example_id": i,
                "label": label,
                **{f"prob_{n}": float(p) for n, p in zip(self.label_names, row, strict=True)},
            }
            for i, label, row in zip(self.example_ids, labels, probs, strict=True)
        ]


def format_metrics(metrics: dict[str, float]) -> str:
    return " | ".join(f"{k} {v:.4f}" if not math.isnan(v) else f"{k} nan" for k, v in metrics.items())


def format_report(report: dict[str, Any]) -> list[str]:
    """A classification report for people: per-class precision, recall, F1 and support, then the
    confusion matrix (rows: true class, columns: predicted)."""
    names = [str(name) for name in report["labels"]]
    width = max(len("class"), *map(len, names))
    lines = [f"{'class':<{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>7}"]
    for name in names:
        row = report["per_class"][name]
        lines.append(
            f"{name:<{width}}  {row['precision']:>9.4f}  {row['recall']:>9.4f}  {row['f1']:>9.4f}  "
            f"{row['support']:>7}"
        )
    cell = max(7, *map(len, names), *(len(str(n)) for row in report["confusion"] for n in row))
    lines.append("confusion (rows: true class, columns: predicted)")
    lines.append(f"{'':<{width}}  " + "  ".join(f"{name:>{cell}}" for name in names))
    for name, row in zip(names, report["confusion"], strict=True):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{n:>{cell}}" for n in row))
    return lines
