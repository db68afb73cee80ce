"""Evaluation metrics computed with torch (scikit-learn and scipy are only the tests' reference)."""

from __future__ import annotations

from typing import Any

import torch


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predictions == labels).float().mean()) if len(labels) else float("nan")


def _counts(
    predictions: torch.Tensor, labels: torch.Tensor, classes: list[int]
) -> list[tuple[int, int, int]]:
    """(true positives, false positives, false negatives) of each class."""
    out = []
    for c in classes:
        predicted, actual = predictions == c, labels == c
        out.append(
            (
                int((predicted & actual).sum()),
                int((predicted & ~actual).sum()),
                int((~predicted & actual).sum()),
            )
        )
    return out


def _f1(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean F1 over the classes present in ``labels`` or ``predictions`` (scikit-learn's
    ``f1_score(average="macro")``): a class the split never shows and the model never predicts has no
    F1, and counting it as 0 would punish a split for missing a class."""
    if not len(labels):
        return float("nan")
    classes = torch.unique(torch.cat([labels, predictions])).tolist()
    return sum(_f1(*counts) for counts in _counts(predictions, labels, classes)) / len(classes)


def class_report(predictions: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support (scikit-learn's ``precision_recall_fscore_support``
    with ``zero_division=0``) and the confusion matrix (rows: true class, columns: predicted)."""
    classes = list(range(len(names)))
    per_class = {}
    for name, (tp, fp, fn) in zip(names, _counts(predictions, labels, classes), strict=True):
        per_class[name] = {
            "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0,
            "f1": _f1(tp, fp, fn),
            "support": tp + fn,
        }
    confusion = torch.zeros(len(names), len(names), dtype=torch.long)
    confusion.index_put_(
        (labels.long(), predictions.long()), torch.ones(len(labels), dtype=torch.long), accumulate=True
    )
    return {"labels": list(names), "per_class": per_class, "confusion": confusion.tolist()}


def pearson(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Pearson correlation; NaN when there are fewer than two points or either side is constant."""
    x, y = predictions.double().flatten(), targets.double().flatten()
    if len(x) < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else float("nan")


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties sharing the mean of the ranks they span (what Spearman's rho needs)."""
    values = values.double().flatten()
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    ranks = torch.empty_like(values)
    start = 0
    n = len(values)
    while start < n:
        stop = start + 1
        while stop < n and sorted_values[stop] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop + 1) / 2  # mean of ranks start+1 .. stop
        start = stop
    return ranks


def spearman(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Spearman's rank correlation: Pearson on average ranks (ties handled like scipy.stats.spearmanr)."""
    return pearson(average_ranks(predictions), average_ranks(targets))


def match_ranks(similarity: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """For each row of a similarity matrix, whose match is column ``offset + row``: how many other
    columns score at least as high (0 = retrieved first). Ties count against the match, so collapsed
    embeddings, where everything ties, score no better than chance."""
    rows = torch.arange(similarity.shape[0], device=similarity.device)
    matched = similarity[rows, rows + offset][:, None]
    return (similarity >= matched).sum(dim=1) - 1


def retrieval_metrics_from_ranks(
    q2g: torch.Tensor, g2q: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """R@K in percent for both directions and rSum, their sum (at most 600 with the default ks)."""
    metrics: dict[str, float] = {}
    for name, ranks in (("q2g", q2g), ("g2q", g2q)):
        for k in ks:
            metrics[f"{name}_r{k}"] = float((ranks < k).double().mean() * 100) if len(ranks) else float("nan")
    metrics["rsum"] = sum(metrics.values())
    return metrics


def retrieval_metrics(similarity: torch.Tensor) -> dict[str, float]:
    """Query i (row) matches gallery item i (column): R@1/5/10 both ways and rSum."""
    return retrieval_metrics_from_ranks(match_ranks(similarity), match_ranks(similarity.T))


def collapse_warnings(
    metrics: dict[str, Any], report: dict[str, Any] | None, select: str | None
) -> list[str]:
    """What says a trained model learnt nothing, in words for the summary line and the record: every val or
    test prediction is one class, the predictions do not vary (regression), or the metric that picked the
    best epoch is the majority class's within one validation example."""
    advice = "train longer (train.epochs) or try another train.lr"
    found = []
    for split, details in (report or {}).items():
        confusion = details.get("confusion") if isinstance(details, dict) else None
        if not confusion:
            continue
        predicted = [sum(column) for column in zip(*confusion, strict=True)]
        present = [row for row in confusion if sum(row)]
        used = [i for i, count in enumerate(predicted) if count]
        if len(used) == 1 and len(present) > 1:
            name = details.get("labels", [str(used[0])])[used[0]]
            found.append(f"the model predicts one class ({name}) for every {split} example; {advice}")
    for split in ("val", "test"):
        pearson_value = metrics.get(f"{split}_pearson", 0.0)
        if f"{split}_mse" in metrics and (pearson_value is None or pearson_value != pearson_value):
            found.append(f"the model predicts the same value for every {split} example; {advice}")
    if found or not select:
        return found
    # Classification: a selected metric within one validation example of the majority class's is no signal.
    ours, baseline = metrics.get(f"val_{select}"), metrics.get(f"majority_val_{select}")
    val_examples = sum(sum(row) for row in ((report or {}).get("val") or {}).get("confusion", []))
    if isinstance(ours, float) and isinstance(baseline, float) and val_examples:
        if abs(ours - baseline) <= 1 / val_examples:
            found.append(f"val_{select} {ours:.4f} is the majority class's ({baseline:.4f}); {advice}")
    return found
