"""Augmented views (extract.views): K = 1 against K = 4 on MNIST-5k (EfficientNet-Lite0) and Rotten Tomatoes.

Per dataset, one cache root: K = 1 is extracted first, then K = 4 on top of it (view 0 is reused, only
views 1..3 of the training examples are extracted), so the K = 4 extraction seconds are what it adds and
its bytes on disk are the whole root. UniPT then trains from each cache with every seed (training reads
view (epoch + seed) mod K; val and test read view 0) and the test accuracies are reported as mean ± std.

    python benchmarks/augmented_views.py [--datasets mnist rt] [--rt-limit 1000] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, machine, mean_std, print_table, write_report  # noqa: E402
from unipt.pipeline import experiment  # noqa: E402
from unipt.pipeline.config import load_config  # noqa: E402
from unipt.pipeline.storage import Location  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MNIST_LAYERS = "[4,5]"  # two 7x7 stages (80 and 112 channels): the cnn variant needs grids that divide


def _overrides(dataset: str, work: Path, views: int, seed: int, args: argparse.Namespace) -> list[str]:
    common = [
        f"storage.cache_root={work / 'cache'}",
        f"storage.runs_root={work / 'runs'}",
        f"storage.registry={work / 'registry.sqlite'}",
        f"extract.views={views}",
        "train.device=cpu",
        f"seed={seed}",
    ]
    if dataset == "mnist":
        return [
            "name=mnist_effnet",
            "dataset.source=bundled:mnist_5k",
            "dataset.id_column=null",
            "backbone.name_or_path=bundled:efficientnet-lite0",
            f"backbone.layers={MNIST_LAYERS}",
            "backbone.batch_size=64",
            "train.variant=cnn",
            "train.embed_size=128",
            f"train.epochs={args.mnist_epochs}",
            *([f"dataset.limit={args.mnist_limit}"] if args.mnist_limit else []),
            *common,
        ]
    return [
        f"train.epochs={args.rt_epochs}",
        *([f"dataset.limit={args.rt_limit}"] if args.rt_limit else []),
        *common,
    ]


def _prepare(dataset: str, work: Path, views: int, seed: int, args: argparse.Namespace):
    return experiment.prepare(
        load_config(ROOT / "configs" / "rt_minilm.yaml", _overrides(dataset, work, views, seed, args))
    )


def run_dataset(dataset: str, args: argparse.Namespace) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix=f"unipt-views-{dataset}-"))
    rows = []
    try:
        for views in (1, 4):
            prep = _prepare(dataset, work, views, args.seeds[0], args)
            t0 = time.perf_counter()
            result = experiment.extract(prep, progress=False)
            seconds = time.perf_counter() - t0
            result.release()
            counts = prep.dataset.split_counts()
            accuracies, train_seconds = [], []
            for seed in args.seeds:
                t1 = time.perf_counter()
                trained = experiment.train(_prepare(dataset, work, views, seed, args), progress=False)
                train_seconds.append(time.perf_counter() - t1)
                accuracies.append(float(trained.metrics["test_acc"]))
                print(f"{dataset} K={views} seed {seed}: test_acc {accuracies[-1]:.4f}", flush=True)
            mean, std = mean_std(accuracies)
            rows.append(
                {
                    "dataset": dataset,
                    "views": views,
                    "examples": len(prep.dataset),
                    "train_examples": counts["train"],
                    "inputs_extracted": result.examples,
                    "extract_s": round(seconds, 1),
                    "forward_s": round(float(result.stats.get("forward_s", 0.0)), 1),
                    "disk_bytes": Location(work / "cache").size(),
                    "test_acc_mean": round(mean, 4),
                    "test_acc_std": round(std, 4),
                    "test_accs": accuracies,
                    "train_s_per_seed": round(sorted(train_seconds)[len(train_seconds) // 2], 1),
                }
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "rt"], choices=["mnist", "rt"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--rt-limit", type=int, default=1000, help="a seeded sample of Rotten Tomatoes (0: all)"
    )
    parser.add_argument("--rt-epochs", type=int, default=4)
    parser.add_argument("--mnist-limit", type=int, default=0, help="a seeded sample of MNIST-5k (0: all)")
    parser.add_argument("--mnist-epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS / "augmented_views.json")
    args = parser.parse_args()
    header = ["dataset", "views", "examples", "inputs_extracted", "extract_s", "forward_s", "disk_bytes",
              "test_acc_mean", "test_acc_std", "train_s_per_seed"]  # fmt: skip
    settings = {
        k: getattr(args, k) for k in ("seeds", "rt_limit", "rt_epochs", "mnist_limit", "mnist_epochs")
    }
    rows: list[dict] = []
    for dataset in args.datasets:  # the report is rewritten after each dataset: a partial run keeps its rows
        rows += run_dataset(dataset, args)
        report = {"machine": machine(), **settings, "mnist_layers": MNIST_LAYERS, "rows": rows}
        write_report(args.out, report, header, quiet=dataset != args.datasets[-1])
    print_table(header, [[row[c] for c in header] for row in rows])


if __name__ == "__main__":
    main()
