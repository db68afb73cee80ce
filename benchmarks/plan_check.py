"""``unipt plan``'s predictions next to what the planned job then measures, in one run.

    python benchmarks/plan_check.py [--size 2000] [--sample 256]

On the default experiment (``configs/rt_minilm.yaml``, the bundled MiniLM, the first ``--size`` Rotten
Tomatoes snippets, ``train.epochs=1``), each step in a fresh process as ``benchmarks/scaling.py`` runs them:
the plan from a ``--sample``-example sample, then the real extraction (a fresh cache root), one UniPT epoch
from that cache, and one online epoch (the backbone on every batch). Prints predicted, actual and their
ratio for the tokens, each dtype's bytes on disk, the extraction, and both epochs; writes
``benchmarks/results/plan_check.json``. Times are only as good as the machine's quiet: run it alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, machine, print_table  # noqa: E402
from benchmarks.scaling import _child, backbone_dir  # noqa: E402


def compare(predicted: dict[str, Any], actual: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per predicted quantity that the real job measured."""
    pairs = [
        ("tokens", predicted["tokens"], actual["extract"]["tokens"]),
        ("float16 cache bytes", predicted["bytes_by_dtype"]["float16"], actual["extract"]["fp16_bytes"]),
        ("int8 cache bytes", predicted["bytes_by_dtype"]["int8"], actual["extract"]["int8_bytes"]),
        ("extraction s", predicted["extract_s"], actual["extract"]["extract_s"]),
        ("epoch from cache s", predicted["cache_epoch_s"], actual["cache"]["epoch_s"]),
        ("online epoch s", predicted["online_epoch_s"], actual["online"]["epoch_s"]),
    ]
    return [
        {"quantity": name, "predicted": float(p), "actual": float(a), "ratio": float(p) / float(a)}
        for name, p, a in pairs
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=2000, help="snippets in the planned dataset")
    parser.add_argument("--sample", type=int, default=256, help="the plan's sample (unipt plan --sample)")
    parser.add_argument("--out", default=str(RESULTS / "plan_check.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="unipt-plan-check-"))
    try:
        backbone = backbone_dir("minilm", work)
        cache_root = work / "caches"
        predicted = _child(f"plan{args.sample}", backbone, args.size, cache_root)
        actual = {
            step: _child(step, backbone, args.size, cache_root) for step in ("extract", "cache", "online")
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = compare(predicted, actual)
    print_table(
        ["quantity", "predicted", "actual", "predicted / actual"],
        [[r["quantity"], f"{r['predicted']:,.1f}", f"{r['actual']:,.1f}", f"{r['ratio']:.2f}"] for r in rows],
    )
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "size": args.size,
        "sample": args.sample,
        "rows": rows,
        "predicted": predicted,
        "actual": actual,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
