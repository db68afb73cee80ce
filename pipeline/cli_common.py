"""What every experiment command shares: reading the config with its flags, and the summary line."""

from __future__ import annotations

import argparse

from pipeline import experiment
from pipeline.config import ExperimentConfig, load_config
from pipeline.log import human_bytes
from pipeline.tasks import get_task


def load_args(args: argparse.Namespace) -> ExperimentConfig:
    """The config file with ``--set`` and the storage flags applied."""
    overrides = list(args.set or [])
    if args.cache_root:
        overrides.append(f"storage.cache_root={args.cache_root}")
    if args.runs_root:
        overrides.append(f"storage.runs_root={args.runs_root}")
    if args.registry:
        overrides.append(f"storage.registry={args.registry}")
    return load_config(args.config, overrides)


def summary_line(result: experiment.RunResult) -> str:
    """One line per run: the task's headline metric (and the probe's), timings, cache size, run dir."""
    trained, timings = result.trained, result.timings
    m, name = trained.metrics, get_task(trained.task).headline
    probe = f" (linear probe {m[f'probe_test_{name}']:.4f})" if f"probe_test_{name}" in m else ""
    return (
        f"test_{name} {m[f'test_{name}']:.4f}{probe} | val_{name} {m[f'val_{name}']:.4f} | "
        f"extract {timings.extract_s:.1f}s ({'cache hit' if result.cache_hit else 'cache miss'}) | "
        f"train {m['train_seconds']:.1f}s ({m['seconds_per_epoch']:.1f}s/epoch) | "
        f"cache {human_bytes(trained.cache_bytes)} | run {result.run_dir}"
    )


def print_summary(result: experiment.RunResult) -> None:
    print(summary_line(result), flush=True)
