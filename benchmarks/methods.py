"""The methods comparison (issue 14): every frozen-backbone method trained from one shared cache per dataset.

Datasets, each with the bundled all-MiniLM-L6-v2 and its own config:

- ``rotten_tomatoes`` (configs/rt_minilm.yaml): critic snippets, fresh/rotten, split by movie;
- ``bbc_news`` (configs/bbc_minilm.yaml): news articles, 5 topics, 256 tokens;
- ``rt_movie_score`` (configs/rt_score_minilm.yaml): regression, each snippet's movie tomatometer.

Each dataset's cache is extracted once (``unipt.pipeline.experiment.extract``); then every method in
``train.method`` (linear_probe, scalar_mix, lst, unipt) trains from that same cache with each seed through
the recipe (``unipt.pipeline.experiment.train``), and full fine-tuning of the backbone (a linear layer
into the task's head, at ``train.lr / 10``, ``benchmarks.online_baselines.train_online``) runs once, seed 0,
for every dataset: it trains the config's ``train.task`` with the head, metrics and best-epoch rule of the
cache runs, so its row is regression too on ``rt_movie_score`` (a task with no online baseline, such as
retrieval, is skipped with a note). Every (dataset, method, seed) trains in a fresh Python process, so
its peak RSS is that training's alone. Recorded per run: the task's headline test metric (accuracy, or
Pearson for regression) and its val value, trainable parameters, peak RSS, median seconds per epoch (each
epoch includes its validation pass). Prints mean ± std over seeds and writes
benchmarks/results/methods.json and .csv (one row per dataset and method), rewritten after every run, so
a long run that is stopped keeps what it measured (``--resume`` continues it).

    python benchmarks/methods.py                                    # full data, 3 seeds (hours on 2 cores)
    python benchmarks/methods.py --limit 2000 --epochs 3            # a seeded sample of each dataset
    python benchmarks/methods.py --datasets rotten_tomatoes --seeds 0 --limit 300 --epochs 1 \
        --skip-full-finetune                                         # a quick look
    python benchmarks/methods.py --merge a.json b.json --out benchmarks/results/methods.json
                                                                     # runs made in parallel, one report
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, machine, mean_std, print_table, write_report  # noqa: E402
from unipt.pipeline.config import ExperimentConfig, load_config  # noqa: E402
from unipt.pipeline.errors import UniptError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "rotten_tomatoes": ROOT / "configs" / "rt_minilm.yaml",
    "bbc_news": ROOT / "configs" / "bbc_minilm.yaml",
    "rt_movie_score": ROOT / "configs" / "rt_score_minilm.yaml",
}
METHODS = ("linear_probe", "scalar_mix", "lst", "unipt")
FULL_FINETUNE = "full_finetune"
# UniPT's goal (issue 14): above scalar mix and LST, and within this much of full fine-tuning.
GOAL_MARGIN = 0.01
COLUMNS = (
    "dataset",
    "method",
    "metric",
    "seeds",
    "test_mean",
    "test_std",
    "val_mean",
    "val_std",
    "trainable_params",
    "peak_rss_mib",
    "seconds_per_epoch",
    "epochs",
    "examples",
)


# --- one training, in its own process -----------------------------------------------------------------------
def run_one(method: str, config: ExperimentConfig, finetune_lr: float | None = None) -> dict[str, Any]:
    """Train ``method`` once in this process (a fresh interpreter per run) and measure it; ``config`` has
    ``train.method`` set to it (for a frozen-backbone method) and the run's seed. ``finetune_lr``: full
    fine-tuning's learning rate (default ``train.lr / 10``)."""
    from benchmarks.resources import peak_cuda_mib, peak_rss_mib
    from unipt.pipeline import experiment
    from unipt.pipeline.tasks import get_task

    task = get_task(config.train.task)
    started = time.perf_counter()
    if method == FULL_FINETUNE:
        from benchmarks.online_baselines import train_online
        from unipt.pipeline.data.table import load_dataset

        dataset = load_dataset(config.dataset, task=config.train.task)
        result = train_online(
            dataset.table,
            dataset.label_names,
            config.primary_backbone,
            config.train,
            config.seed,
            "full-finetune",
            config.extract,
            finetune_lr=finetune_lr,
        )
        metrics, history, examples = result.metrics, result.history, len(dataset)
    else:
        prep = experiment.prepare(config)
        trained = experiment.train(prep, progress=False)
        metrics, history, examples = trained.metrics, trained.history, len(prep.dataset)
    return {
        "method": method,
        "seed": config.seed,
        "metric": task.headline,
        "test": metrics[task.test_metric],
        "val": metrics[task.val_metric],
        "best_epoch": metrics.get("best_epoch"),
        "epochs": len(history),
        "trainable_params": metrics["trainable_params"],
        "peak_rss_mib": peak_rss_mib(),
        "peak_gpu_mib": peak_cuda_mib(),  # None when it trained on the CPU
        "seconds_per_epoch": statistics.median(h["seconds"] for h in history),
        "train_seconds": time.perf_counter() - started,
        "examples": examples,
        "load_average_1m": os.getloadavg()[0],
    }


def _child(
    method: str, config_path: Path, overrides: list[str], seed: int, finetune_lr: float | None = None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", method]
        command += ["--config", str(config_path), "--seed", str(seed), "--result", str(out)]
        if finetune_lr is not None:
            command += ["--finetune-lr", repr(finetune_lr)]
        command += [arg for item in overrides for arg in ("--set", item)]
        done = subprocess.run(command, stdout=None, stderr=None)
        if done.returncode != 0 or not out.exists():
            raise UniptError(
                f"{method} (seed {seed}) failed (exit {done.returncode}); its error is printed above"
            )
        return json.loads(out.read_text())


# --- the driver --------------------------------------------------------------------------------------------
def dataset_overrides(args: argparse.Namespace, limit: int | None) -> list[str]:
    # The in-run probe baseline is off: linear_probe is a method of its own here, timed like the others.
    overrides = [f"storage.cache_root={args.cache_root}", "train.probe_baseline=false"]
    if limit is not None:
        overrides.append(f"dataset.limit={limit}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    return overrides + list(args.set or [])


def summarise(dataset: str, method: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: mean ± std of the headline metric over seeds, medians of the costs."""
    test_mean, test_std = mean_std([r["test"] for r in runs])
    val_mean, val_std = mean_std([r["val"] for r in runs])
    gpu = [r["peak_gpu_mib"] for r in runs if r.get("peak_gpu_mib") is not None] or None
    return {
        "dataset": dataset,
        "method": method,
        "metric": runs[0]["metric"],
        "seeds": len(runs),
        "test_mean": test_mean,
        "test_std": test_std,
        "val_mean": val_mean,
        "val_std": val_std,
        "trainable_params": runs[0]["trainable_params"],
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
        "seconds_per_epoch": statistics.median(r["seconds_per_epoch"] for r in runs),
        # GPU memory where the runs trained on one (runs recorded before it was measured have no entry).
        "peak_gpu_mib": None if gpu is None else statistics.median(gpu),
        "epochs": runs[0]["epochs"],
        "examples": runs[0]["examples"],
    }


def goal(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per dataset: is UniPT's mean test metric above scalar mix's and LST's, and within GOAL_MARGIN of
    full fine-tuning's (None where a row is missing)?"""
    out = {}
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mean = {r["method"]: r["test_mean"] for r in rows if r["dataset"] == dataset}
        unipt = mean.get("unipt")
        if unipt is None:
            continue

        fft = mean.get(FULL_FINETUNE)
        out[dataset] = {
            "above_scalar_mix": None if "scalar_mix" not in mean else unipt > mean["scalar_mix"],
            "above_lst": None if "lst" not in mean else unipt > mean["lst"],
            "within_1pt_of_full_finetune": None if fft is None else unipt >= fft - GOAL_MARGIN,
            "unipt_minus_full_finetune": None if fft is None else unipt - fft,
        }
    return out


def print_rows(rows: list[dict[str, Any]]) -> None:
    header = ("dataset", "method", "metric", "test (mean ± std)", "val", "trainable params", "peak RSS MiB",
              "s/epoch", "seeds")  # fmt: skip
    print_table(
        header,
        [
            (
                r["dataset"],
                r["method"],
                r["metric"],
                f"{r['test_mean']:.4f} ± {r['test_std']:.4f}",
                f"{r['val_mean']:.4f}",
                f"{r['trainable_params']:,}",
                f"{r['peak_rss_mib']:.0f}",
                f"{r['seconds_per_epoch']:.2f}",
                r["seeds"],
            )
            for r in rows
        ],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument(
        "--methods", nargs="*", choices=METHODS, default=list(METHODS), help="none: only full fine-tuning"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--limit", type=int, help="dataset.limit: a seeded sample of each dataset")
    parser.add_argument("--epochs", type=int, help="train.epochs (default: each config's)")
    parser.add_argument("--skip-full-finetune", action="store_true", help="no full fine-tuning row")
    parser.add_argument("--finetune-limit", type=int,
                        help="dataset.limit for full fine-tuning only (default: --limit; smaller is faster, "
                        "but another sample: the report says which)")  # fmt: skip
    parser.add_argument("--finetune-epochs", type=int,
                        help="train.epochs for full fine-tuning only (default: --epochs): at a tenth of the "
                        "learning rate it needs more steps than the frozen-backbone methods")  # fmt: skip
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any config override (repeatable)"
    )
    parser.add_argument("--cache-root", default=".unipt/cache", help="storage.cache_root for every dataset")
    parser.add_argument("--out", default=str(RESULTS / "methods.json"), help="JSON report; the CSV beside it")
    parser.add_argument("--resume", action="store_true", help="keep --out's runs, add the missing ones")
    parser.add_argument("--merge", nargs="+", metavar="REPORT",
                        help="train nothing: write --out from these reports' runs (and --out's, with "
                        "--resume), for runs made in parallel into separate reports")  # fmt: skip
    parser.add_argument("--worker", choices=[*METHODS, FULL_FINETUNE], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--finetune-lr", type=float, help=argparse.SUPPRESS)
    return parser


def main() -> int:
    args = build_parser().parse_args()
    try:
        if args.worker:
            method = [f"train.method={args.worker}"] if args.worker in METHODS else []
            config = load_config(args.config, [*(args.set or []), f"seed={args.seed}", *method])
            Path(args.result).write_text(json.dumps(run_one(args.worker, config, args.finetune_lr)))
            return 0
        drive(args)
        return 0
    except UniptError as exc:
        print(f"methods: error: {exc}", file=sys.stderr)
        return 2


def _shown_path(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def extract_dataset(dataset: str, config: ExperimentConfig) -> tuple[Any, dict[str, Any]]:
    """Extract ``dataset``'s cache once (or find it built): its prepared experiment and what the report
    says of it."""
    from unipt.pipeline import experiment
    from unipt.pipeline.cache.opener import open_cache

    prep = experiment.prepare(config)
    started = time.perf_counter()
    with experiment.extract(prep, progress=False) as extraction:
        counts = prep.dataset.split_counts()
        info = {
            "config": _shown_path(CONFIGS[dataset]),
            "task": config.train.task,
            "examples": len(prep.dataset),
            "splits": counts,
            "max_length": config.backbone.max_length if config.backbone else None,
            "cache_key": prep.key,
            "cache_hit": extraction.cache_hit,
            "extract_seconds": None if extraction.cache_hit else time.perf_counter() - started,
            "cache_bytes": open_cache(extraction.path).nbytes_on_disk(),
        }
    print(f"{dataset}: {len(prep.dataset)} examples {counts}, cache "
          f"{'hit' if extraction.cache_hit else 'built'}", flush=True)  # fmt: skip
    return prep, info


def drive(args: argparse.Namespace) -> dict[str, Any]:
    """Extract each dataset once, train every (method, seed) and full fine-tuning; write the report."""
    out = Path(args.out)
    runs: list[dict[str, Any]] = []
    datasets: dict[str, Any] = {}
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        runs, datasets = old["runs"], old["datasets"]
    settings = {
        "limit": args.limit,
        "finetune_limit": args.finetune_limit if args.finetune_limit is not None else args.limit,
        "epochs": args.epochs,
        "finetune_epochs": args.finetune_epochs if args.finetune_epochs is not None else args.epochs,
        "seeds": args.seeds,
        "overrides": list(args.set or []),
    }
    started_load = os.getloadavg()[0]

    def save() -> dict[str, Any]:
        # Every dataset and method measured so far, this invocation's or (--resume) an earlier one's.
        rows = [
            summarise(d, m, mine)
            for d in dict.fromkeys(r["dataset"] for r in runs)
            for m in (*METHODS, FULL_FINETUNE)
            if (mine := [r for r in runs if r["dataset"] == d and r["method"] == m])
        ]
        report = {
            "benchmark": "methods",
            "machine": {
                **machine(),
                "load_average_1m_at_start": started_load,
                "load_average_1m_now": os.getloadavg()[0],
            },  # fmt: skip
            "note": "CPU cores shared with other jobs: compare rows of one run; seconds are wall time",
            "settings": settings,
            "datasets": datasets,
            "goal": {"unipt": f"above scalar_mix and lst, and at least full_finetune - {GOAL_MARGIN}"}
            | goal(rows),
            "rows": rows,
            "runs": runs,
        }
        write_report(out, report, COLUMNS, quiet=True)
        return report

    def done(dataset: str, method: str, seed: int) -> bool:
        return any((r["dataset"], r["method"], r["seed"]) == (dataset, method, seed) for r in runs)

    if args.merge:
        for path in args.merge:
            other = json.loads(Path(path).read_text())
            for run in other["runs"]:
                if done(run["dataset"], run["method"], run["seed"]):
                    raise UniptError(
                        f"{path} has {run['dataset']} {run['method']} seed {run['seed']} too; merge reports "
                        "of different runs only"
                    )
                runs.append(run)
            datasets |= other["datasets"]
        settings["merged"] = [_shown_path(Path(p).resolve()) for p in args.merge]
        return save()

    for dataset in args.datasets:
        overrides = dataset_overrides(args, args.limit)
        config = load_config(CONFIGS[dataset], overrides)
        prep, datasets[dataset] = extract_dataset(dataset, config)
        for method in args.methods:
            for seed in args.seeds:
                if done(dataset, method, seed):
                    continue
                run = {"dataset": dataset, **_child(method, CONFIGS[dataset], overrides, seed)}
                runs.append(run)
                print(f"  {method} seed {seed}: test {run['metric']} {run['test']:.4f} | "
                      f"{run['peak_rss_mib']:.0f} MiB | {run['seconds_per_epoch']:.2f} s/epoch",
                      flush=True)  # fmt: skip
                save()
        if args.skip_full_finetune or done(dataset, FULL_FINETUNE, args.seeds[0]):
            continue
        if prep.task.head is None:
            print(f"  {FULL_FINETUNE}: skipped for {dataset} (train.task {config.train.task} has no online "
                  "baseline: it is not one model with one head)", flush=True)  # fmt: skip
            continue
        ft_overrides = dataset_overrides(args, settings["finetune_limit"])
        if args.finetune_epochs is not None:
            ft_overrides.append(f"train.epochs={args.finetune_epochs}")  # the later override wins
        run = {"dataset": dataset, **_child(FULL_FINETUNE, CONFIGS[dataset], ft_overrides, args.seeds[0])}
        runs.append(run)
        print(f"  {FULL_FINETUNE} seed {args.seeds[0]}: test {run['metric']} {run['test']:.4f} on "
              f"{run['examples']} examples | {run['peak_rss_mib']:.0f} MiB", flush=True)  # fmt: skip
        save()
    report = save()
    print()
    print_rows(report["rows"])
    print(json.dumps({k: v for k, v in report["goal"].items()}, indent=2))
    print(f"\nwritten to {out} and {out.with_suffix('.csv')}", flush=True)
    return report


if __name__ == "__main__":
    sys.exit(main())
