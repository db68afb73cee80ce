"""The accuracy / memory trade-off: test accuracy against peak RSS for every method benchmarked.

Reads benchmarks/results/accuracy.json (benchmarks/accuracy.py: mean ± std over seeds, one panel per
dataset) and, when present, benchmarks/results/baselines.json (benchmarks/baselines.py: one seed, with
UniPT online too, drawn as hollow markers on its dataset's panel). Writes benchmarks/results/tradeoff.png.

    python benchmarks/plot_tradeoff.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
TICKS = (250, 500, 1000, 2000, 4000, 8000, 16000, 32000)
COLORS = {
    "linear-probe": "tab:gray",
    "unipt-fp16": "tab:blue",
    "unipt-cache": "tab:blue",
    "unipt-int8": "tab:cyan",
    "unipt-online": "tab:purple",
    "full-finetune": "tab:red",
}


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _baseline_dataset(report: dict[str, Any]) -> str:
    """baselines.py runs one config; its dataset is the config's unless overridden on the command line."""
    for item in report.get("overrides", []):
        if item.startswith("dataset.source=bundled:"):
            return item.split(":", 1)[1]
    return "rotten_tomatoes"


def _limit(settings: dict[str, Any] | None, overrides: list[str] | None = None) -> str:
    """How many examples a panel's points were trained on, for the legend: runs differ in that."""
    for item in overrides or []:
        if item.startswith("dataset.limit="):
            return f"{item.split('=', 1)[1]} ex."
    limit = (settings or {}).get("limit")
    return f"{limit} ex." if limit else "all ex."


def plot(accuracy: dict[str, Any] | None, baselines: dict[str, Any] | None, out: Path) -> Path:
    """Draw the panels and save them to ``out``; at least one of the reports must be given."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    if accuracy is None and baselines is None:
        raise ValueError("no results to plot: run benchmarks/accuracy.py or benchmarks/baselines.py first")
    datasets = list(dict.fromkeys(r["dataset"] for r in (accuracy or {}).get("rows", [])))
    if baselines is not None and _baseline_dataset(baselines) not in datasets:
        datasets.append(_baseline_dataset(baselines))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), dpi=110, squeeze=False)
    for axis, dataset in zip(axes[0], datasets, strict=True):
        for row in (accuracy or {}).get("rows", []):
            if row["dataset"] != dataset or row.get("peak_rss_mib") is None:
                continue
            info = (accuracy or {}).get("datasets", {}).get(dataset, {})
            axis.errorbar(
                row["peak_rss_mib"],
                row["test_acc_mean"],
                yerr=row["test_acc_std"],
                fmt="o",
                capsize=4,
                markersize=8,
                color=COLORS.get(row["method"], "black"),
                label=f"{row['method']} ({_limit(info.get('settings'))}, {row['seeds']} seeds)",
            )
        if baselines is not None and _baseline_dataset(baselines) == dataset:
            examples = _limit(None, baselines.get("overrides"))
            for row in baselines.get("rows", []):
                if row.get("peak_rss_mib") is None or row.get("test_acc") is None:
                    continue
                axis.scatter(
                    row["peak_rss_mib"],
                    row["test_acc"],
                    s=70,
                    facecolors="none",
                    edgecolors=COLORS.get(row["method"], "black"),
                    linewidths=1.8,
                    marker="s",
                    label=f"{row['method']} (baselines.py, {examples}, 1 seed)",
                )
        axis.set_xscale("log")
        low, high = axis.get_xlim()
        # Round MiB values as ticks: log scale's own ticks are powers of ten, too few over this range.
        axis.set_xticks([t for t in TICKS if low <= t <= high] or [low, high])
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("peak RSS of the training process (MiB, log scale)")
        axis.set_ylabel("test accuracy")
        axis.set_title(dataset.replace("_", " "))
        axis.grid(True, alpha=0.3, which="both")
        axis.legend(fontsize=7, loc="best")
    stamp = (accuracy or baselines or {}).get("date", "")
    cpus = ((accuracy or baselines or {}).get("machine") or {}).get("cpus")
    fig.suptitle(f"Accuracy vs memory, all-MiniLM-L6-v2 ({stamp}, {cpus} CPU cores)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--accuracy", default=str(RESULTS / "accuracy.json"))
    parser.add_argument("--baselines", default=str(RESULTS / "baselines.json"))
    parser.add_argument("--out", default=str(RESULTS / "tradeoff.png"))
    args = parser.parse_args()
    out = plot(_load(Path(args.accuracy)), _load(Path(args.baselines)), Path(args.out))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
