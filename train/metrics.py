"""Evaluation metrics computed with torch (no scikit-learn or scipy dependency)."""

from __future__ import annotations

import torch


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predictions == labels).float().mean()) if len(labels) else float("nan")


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = int(((predictions == c) & (labels == c)).sum())
        fp = int(((predictions == c) & (labels != c)).sum())
        fn = int(((predictions != c) & (labels == c)).sum())
        denominator = 2 * tp + fp + fn
        scores.append(2 * tp / denominator if denominator else 0.0)
    return sum(scores) / num_classes


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
