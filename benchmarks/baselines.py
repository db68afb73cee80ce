"""Baselines in one harness: linear probe, UniPT from the cache, UniPT online, full fine-tuning.

One config, one dataset and split, one seed. The cache is extracted (or found) first; then every
method trains in a fresh Python process of its own, so each peak RSS is that method's alone:

- ``linear-probe``: logistic regression on the last layer's mean-pooled cached tokens (train/probe.py);
- ``unipt-cache``: UniPT trained from the cache, no backbone in memory (train/loop.py);
- ``unipt-online``: the same UniPT, the frozen backbone in memory and run on every batch of every
  epoch, as the paper's code does (benchmarks/online_baselines.py);
- ``full-finetune``: the backbone trained with a linear head, at ``train.lr / 10``.

The online runs walk the same batches in the same order as the cached run. Prints a table (accuracy,
trainable parameters, peak RSS, seconds per epoch, and both as ratios to UniPT from the cache) and
writes benchmarks/results/baselines.json and .csv. Seconds per epoch is the median over epochs (each
epoch includes its validation pass); with ``--repeats N`` every number is the median over N processes.

    python benchmarks/baselines.py --limit 2000 --epochs 3     # the README's table (~40 min on 2 cores)
    python benchmarks/baselines.py --tiny                      # CI size: 400 snippets, 2 epochs
    python benchmarks/baselines.py --methods unipt-cache unipt-online --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unipt.pipeline.config import ExperimentConfig, load_config  # noqa: E402
from unipt.pipeline.errors import UniptError  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "baselines.json"
METHODS = ("linear-probe", "unipt-cache", "unipt-online", "full-finetune")
TINY = {"limit": 400, "epochs": 2}
COLUMNS = (
    "method",
    "val_acc",
    "test_acc",
    "trainable_params",
    "peak_rss_mib",
    "rss_ratio",
    "seconds_per_epoch",
    "epoch_time_ratio",
    "cpu_seconds_per_epoch",
    "cpu_time_ratio",
    "train_seconds",
    "setup_seconds",
    "peak_cuda_mib",
    "lr",
)


def _median(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# --- one method, in its own process -----------------------------------------------------------------------
def run_method(method: str, config: ExperimentConfig, cache: str, progress: bool) -> dict[str, Any]:
    """Train ``method`` once in this process and measure it (called in a fresh interpreter per method)."""
    from benchmarks.resources import peak_cuda_mib, peak_rss_mib

    seed, train = config.seed, config.train
    if method in ("linear-probe", "unipt-cache"):
        from unipt.pipeline.cache.opener import open_cache

        started = time.perf_counter()
        reader = open_cache(cache)
        setup = time.perf_counter() - started
        if method == "linear-probe":
            from unipt.train.probe import linear_probe

            started, cpu = time.perf_counter(), time.process_time()
            probe = linear_probe(reader, seed)
            width = reader.hidden_sizes[reader.layers[-1]]
            row = {
                "val_acc": probe["probe_val_acc"],
                "test_acc": probe["probe_test_acc"],
                "trainable_params": (width + 1) * len(reader.label_names),  # weights + bias per class
                "train_seconds": time.perf_counter() - started,
                "seconds_per_epoch": None,  # L-BFGS on pooled features: no epochs
                "cpu_seconds_per_epoch": None,
                "cpu_seconds": time.process_time() - cpu,
            }
        else:
            from unipt.train.tasks import train_task

            cpu = time.process_time()
            result = train_task(reader, train, seed, progress=progress)
            row = _from_train_result(result, time.process_time() - cpu)
        row["setup_seconds"] = setup
    else:
        from benchmarks.online_baselines import fit_online, load_online_data
        from unipt.pipeline.data.table import load_dataset

        if config.backbone is None:
            raise UniptError("baselines take a config with one `backbone`, not a `backbones` mapping")
        dataset = load_dataset(config.dataset, task=train.task)
        data = load_online_data(dataset.table, dataset.label_names, config.backbone, train, config.extract)
        cpu = time.process_time()
        result, _ = fit_online(data, train, seed, method, progress=progress)
        row = _from_train_result(result, time.process_time() - cpu)
        row |= {k: result.metrics[k] for k in ("setup_seconds", "lr", "backbone_params")}
    return {
        "method": method,
        **row,
        "peak_rss_mib": peak_rss_mib(),
        "peak_cuda_mib": peak_cuda_mib(),
        "transformers_loaded": "transformers" in sys.modules,
    }


def _from_train_result(result: Any, cpu_seconds: float) -> dict[str, Any]:
    m = result.metrics
    return {
        "val_acc": m["val_acc"],
        "test_acc": m["test_acc"],
        "val_f1": m["val_f1"],
        "test_f1": m["test_f1"],
        "best_epoch": m["best_epoch"],
        "epochs": m["epochs"],
        "trainable_params": m["trainable_params"],
        "train_seconds": m["train_seconds"],
        "seconds_per_epoch": statistics.median(h["seconds"] for h in result.history),
        "epoch_seconds": [h["seconds"] for h in result.history],
        # CPU time of this process (all its threads) over the whole call, test pass included: on a
        # machine shared with other work it moves far less than wall time does.
        "cpu_seconds": cpu_seconds,
        "cpu_seconds_per_epoch": cpu_seconds / len(result.history),
        "lr": m.get("lr"),
    }


def _run_child(method: str, args: argparse.Namespace, overrides: list[str], cache: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--config", args.config]
        command += [arg for item in overrides for arg in ("--set", item)]
        command += ["--cache", cache, "--result", str(out)]
        if args.no_progress:
            command.append("--no-progress")
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=None, text=True)
        if done.returncode != 0 or not out.exists():
            raise UniptError(f"{method} failed (exit {done.returncode}); its error is printed above")
        return json.loads(out.read_text())


# --- the driver --------------------------------------------------------------------------------------------
def _overrides(args: argparse.Namespace) -> list[str]:
    limit = args.limit if args.limit is not None else (TINY["limit"] if args.tiny else None)
    epochs = args.epochs if args.epochs is not None else (TINY["epochs"] if args.tiny else None)
    overrides = [f"storage.cache_root={args.cache_root}"] if args.cache_root else []
    if limit is not None:
        overrides.append(f"dataset.limit={limit}")
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    return overrides + list(args.set or [])


def _summarise(method: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "repeats": len(runs)}
    for key in runs[0]:
        if key in ("method", "epoch_seconds"):
            continue
        values = [run[key] for run in runs]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) or v is None for v in values)
        row[key] = _median(values) if numeric else values[0]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values) and row[key] == int(row[key]):
            row[key] = int(row[key])  # a median of two equal counts is still a count
    row["runs"] = runs
    return row


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    cuda = any(r.get("peak_cuda_mib") is not None for r in rows)
    header = ["method", "val acc", "test acc", "trainable params", "peak RSS MiB", "RSS / cache", "s/epoch"]
    header += ["s/epoch / cache", "CPU s/epoch", "CPU / cache"] + (["peak CUDA MiB"] if cuda else [])
    table = []
    for r in rows:
        line = [r["method"], _fmt(r["val_acc"], 4), _fmt(r["test_acc"], 4), _fmt(r["trainable_params"], 0)]
        line += [_fmt(r["peak_rss_mib"], 0), _fmt(r["rss_ratio"], 2), _fmt(r["seconds_per_epoch"], 2)]
        line += [
            _fmt(r["epoch_time_ratio"], 2),
            _fmt(r["cpu_seconds_per_epoch"], 2),
            _fmt(r["cpu_time_ratio"], 2),
        ]
        line += [_fmt(r.get("peak_cuda_mib"), 0)] if cuda else []
        table.append(line)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table, strict=True)]
    for line in (header, ["-" * w for w in widths], *table):
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True)), flush=True)


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each method against UniPT from the cache: time per epoch (wall and CPU) and peak memory."""
    ref = next((r for r in rows if r["method"] == "unipt-cache"), None)

    def ratio(row: dict[str, Any], key: str) -> float | None:
        mine, theirs = row.get(key), ref.get(key) if ref else None
        return mine / theirs if mine is not None and theirs else None

    for row in rows:
        row["epoch_time_ratio"] = ratio(row, "seconds_per_epoch")
        row["cpu_time_ratio"] = ratio(row, "cpu_seconds_per_epoch")
        row["rss_ratio"] = ratio(row, "peak_rss_mib")
        row["cuda_ratio"] = ratio(row, "peak_cuda_mib")


def _write(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    with open(out.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows([[row.get(c) for c in COLUMNS] for row in report["rows"]])


def _machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/rt_minilm.yaml")
    parser.add_argument("--tiny", action="store_true", help=f"CI size: dataset.limit {TINY['limit']}, "
                        f"{TINY['epochs']} epochs (--limit/--epochs still win)")  # fmt: skip
    parser.add_argument("--limit", type=int, help="dataset.limit: a seeded sample of this many examples")
    parser.add_argument("--epochs", type=int, help="train.epochs")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any config override (repeatable)"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per method; medians reported")
    parser.add_argument("--cache-root", help="storage.cache_root (default: the config's)")
    parser.add_argument("--out", default=str(RESULTS), help="JSON report; the CSV goes next to it")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        if args.worker:
            config = load_config(args.config, list(args.set or []))
            row = run_method(args.worker, config, args.cache, progress=not args.no_progress)
            Path(args.result).write_text(json.dumps(row))
            return 0
        return drive(args)
    except UniptError as exc:
        print(f"baselines: error: {exc}", file=sys.stderr)
        return 2


def drive(args: argparse.Namespace) -> int:
    from unipt.pipeline import experiment
    from unipt.pipeline.cache.opener import open_cache

    if args.repeats < 1:
        raise UniptError("--repeats must be at least 1")
    overrides = _overrides(args)
    config = load_config(args.config, overrides)
    if config.train.task != "classification":
        # Its table is accuracy and a logistic probe; the online baselines themselves train any one-head task.
        raise UniptError(
            f"benchmarks/baselines.py compares accuracy on a classification config, not train.task "
            f"{config.train.task!r}; for regression use benchmarks/methods.py (full fine-tuning included)"
        )
    prep = experiment.prepare(config)
    counts = prep.dataset.split_counts()
    started = time.perf_counter()
    extraction = experiment.extract(prep, progress=not args.no_progress)
    extract_s = None if extraction.cache_hit else time.perf_counter() - started
    cache = str(extraction.path)
    print(
        f"{len(prep.dataset)} examples (train {counts['train']}, val {counts['val']}, "
        f"test {counts['test']}), "
        f"{config.train.epochs} epochs; cache {'hit' if extraction.cache_hit else 'built'}: {cache}",
        flush=True,
    )

    rows = []
    for method in args.methods:
        runs = []
        for _ in range(args.repeats):
            runs.append(_run_child(method, args, overrides, cache))
            run = runs[-1]
            print(
                f"{method}: test {run['test_acc']:.4f} val {run['val_acc']:.4f} | "
                f"peak RSS {run['peak_rss_mib']:.0f} MiB | s/epoch {_fmt(run['seconds_per_epoch'], 2)} "
                f"(CPU {_fmt(run['cpu_seconds_per_epoch'], 2)})",
                flush=True,
            )
        rows.append(_summarise(method, runs))
        _add_ratios(rows)
        report = {
            "benchmark": "baselines",
            "date": time.strftime("%Y-%m-%d"),
            "machine": _machine(),
            "config": args.config,
            "overrides": overrides,
            "seed": config.seed,
            "repeats": args.repeats,
            "dataset": {
                "examples": len(prep.dataset),
                "splits": counts,
                "fingerprint": prep.dataset.fingerprint,
            },
            "cache": {
                "path": cache,
                "extract_seconds": extract_s,
                "bytes_on_disk": open_cache(cache).nbytes_on_disk(),
                "dtype": config.extract.dtype,
            },
            "cache_hit": extraction.cache_hit,
            "rows": rows,
        }
        _write(Path(args.out), report)  # after every method, so a long run leaves what it measured
    print()
    print_table(rows)
    out = Path(args.out)
    print(f"\nwritten to {out} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
