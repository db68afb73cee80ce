"""What the storage dtype and the stored layers cost in accuracy: UniPT trained from caches of one dataset.

Runs the default experiment (configs/rt_minilm.yaml: Rotten Tomatoes, all-MiniLM-L6-v2) once per
dtype: one extraction each (the same snippets, the same backbone), then UniPT training with
several seeds from that cache. Prints a table of cache size, test/val accuracy (mean and std over
seeds) and the change against fp16, and writes it to benchmarks/results/dtype_accuracy.json.
``--layer-sets`` adds one fp16 cache per set of stored hidden states (e.g. every second one, the last 4).

    python benchmarks/dtype_accuracy.py                       # fp16 vs int8, 3 seeds (~15 min on 2 cores)
    python benchmarks/dtype_accuracy.py --dtypes float16 bfloat16 int8 --seeds 0
    python benchmarks/dtype_accuracy.py --limit 800 --epochs 2 --seeds 0   # a quick look
    python benchmarks/dtype_accuracy.py --dtypes float16 bfloat16 int8 float8_e4m3 \
        --layer-sets 0,2,4,6 3,4,5,6 --limit 2000 --epochs 3            # the README's dtype/layer table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unipt.pipeline import experiment  # noqa: E402
from unipt.pipeline.config import load_config  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "dtype_accuracy.json"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/rt_minilm.yaml")
    parser.add_argument("--dtypes", nargs="*", default=["float16", "int8"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--limit", type=int, default=None, help="use a seeded sample of this many examples")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--cache-root", default=".unipt/cache")
    parser.add_argument(
        "--layer-sets",
        nargs="*",
        default=[],
        help="extra fp16 caches storing only these hidden states, each set comma-separated (e.g. 0,2,4,6)",
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    base = [f"storage.cache_root={args.cache_root}"]
    if args.limit:
        base.append(f"dataset.limit={args.limit}")
    if args.epochs:
        base.append(f"train.epochs={args.epochs}")
    rows = []
    # (row label, overrides): every dtype with the config's layers, then fp16 with each layer subset.
    variants = [(dtype, [f"extract.dtype={dtype}"]) for dtype in args.dtypes]
    variants += [
        (f"float16 layers {s}", ["extract.dtype=float16", f"backbone.layers=[{s}]"]) for s in args.layer_sets
    ]
    for dtype, variant in variants:
        prep = experiment.prepare(load_config(args.config, [*base, *variant]))
        t0 = time.perf_counter()
        extraction = experiment.extract(prep, progress=True)
        extract_s = time.perf_counter() - t0
        runs = []
        for seed in args.seeds:
            seeded = experiment.prepare(load_config(args.config, [*base, *variant, f"seed={seed}"]))
            trained = experiment.train(seeded, progress=False)
            runs.append(
                {
                    "seed": seed,
                    **{k: trained.metrics[k] for k in ("test_acc", "val_acc", "probe_test_acc")},
                }
            )
            print(
                f"{dtype} seed {seed}: test {runs[-1]['test_acc']:.4f} val {runs[-1]['val_acc']:.4f}",
                flush=True,
            )
        test_mean, test_std = _mean_std([r["test_acc"] for r in runs])
        val_mean, val_std = _mean_std([r["val_acc"] for r in runs])
        rows.append(
            {
                "dtype": dtype,
                "layers": prep.primary.config.layers,
                "cache_key": prep.key,
                "cache_bytes": trained.cache_bytes,
                "extract_s": round(extract_s, 1) if not extraction.cache_hit else None,
                "test_acc_mean": test_mean,
                "test_acc_std": test_std,
                "val_acc_mean": val_mean,
                "val_acc_std": val_std,
                "probe_test_acc_mean": statistics.fmean(r["probe_test_acc"] for r in runs),
                "runs": runs,
            }
        )
        _write(args, base, rows)  # after every variant: a long run that is stopped keeps what it measured

    ref = next((r for r in rows if r["dtype"] == "float16"), rows[0])
    columns = ("dtype", "cache MiB", "size/fp16", "test acc", "val acc", "Δtest", "Δval")
    table = [
        (
            r["dtype"],
            f"{r['cache_bytes'] / 2**20:.0f}",
            f"{r['cache_bytes'] / ref['cache_bytes']:.2f}",
            f"{r['test_acc_mean']:.4f}±{r['test_acc_std']:.4f}",
            f"{r['val_acc_mean']:.4f}±{r['val_acc_std']:.4f}",
            f"{r['test_acc_mean'] - ref['test_acc_mean']:+.4f}",
            f"{r['val_acc_mean'] - ref['val_acc_mean']:+.4f}",
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *table, strict=True)]
    for line in (columns, tuple("-" * w for w in widths), *table):
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True)))
    out = _write(args, base, rows)
    print(f"\nwritten to {out}")


def _write(args: argparse.Namespace, base: list[str], rows: list[dict]) -> Path:
    report = {
        "benchmark": "dtype_accuracy",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m": os.getloadavg()[0],  # the cores may be shared: compare within one run only
        },
        "config": args.config,
        "overrides": base,
        "seeds": args.seeds,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return out


if __name__ == "__main__":
    main()
