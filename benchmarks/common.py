"""What the issue-7 benchmark scripts share: the machine description, table printing, JSON + CSV output."""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """Where the numbers came from; recorded in every report because they mean little without it."""
    import torch

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def print_table(header: Sequence[str], lines: Sequence[Sequence[Any]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    for line in (header, ["-" * w for w in widths], *lines):
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True)), flush=True)


def write_report(out: Path, report: dict[str, Any], columns: Sequence[str], quiet: bool = False) -> None:
    """``report`` as JSON at ``out`` and its ``rows`` (the given columns) as CSV beside it."""
    report = {"date": time.strftime("%Y-%m-%d"), **report}
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed into place: a report that is also a long run's state (--resume,
    # methods_tuned.py) survives a kill in the middle of writing it.
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, out)
    with open(out.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([[row.get(c) for c in columns] for row in report["rows"]])
    if not quiet:
        print(f"\nwritten to {out} and {out.with_suffix('.csv')}", flush=True)
