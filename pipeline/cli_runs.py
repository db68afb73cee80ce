"""``unipt runs ls|show|diff``, ``unipt rerun ID`` and ``unipt sweep CONFIG --grid ...``.

Everything here works through the run registry (:mod:`pipeline.registry`). ``rerun`` and ``sweep``
drive the stages through :mod:`pipeline.cli` (imported lazily: that module imports this one).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pipeline.config import ExperimentConfig, TrainConfig
from pipeline.errors import UniptError
from pipeline.registry import (
    DEFAULT_REGISTRY,
    TIMING_METRICS,
    Registry,
    RunEntry,
    differences,
    result_metrics,
)

if TYPE_CHECKING:
    from pipeline.cli import Prepared


def _say(message: str) -> None:
    print(f"unipt: {message}", file=sys.stderr, flush=True)


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value


def _metric(entry: RunEntry, name: str) -> str:
    value = entry.metrics.get(name)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _lineage(entry: RunEntry) -> str:
    if entry.rerun_of:
        return f"rerun of {entry.rerun_of}"
    if entry.parent_run_id:
        return f"new data, from {entry.parent_run_id}"
    if entry.sweep_id:
        return f"sweep {entry.sweep_id}"
    return ""


def cmd_runs_ls(args: argparse.Namespace) -> int:
    from pathlib import Path

    if not Path(args.registry).expanduser().exists():
        print(f"no runs registered yet in {args.registry}", file=sys.stderr)
        return 0
    with Registry(args.registry, create=False) as registry:
        entries = registry.list(sweep_id=args.sweep, limit=args.limit)
    if not entries:
        print(
            f"no runs in {args.registry}" + (f" for sweep {args.sweep}" if args.sweep else ""),
            file=sys.stderr,
        )
        return 0
    width = max(len(e.run_id) for e in entries)
    print(
        f"{'run_id':<{width}}  {'created_at':<20}  {'name':<16} {'val_acc':>7} {'test_acc':>8}  "
        f"{'dataset':<12}  {'cache':<12}  lineage"
    )
    for e in entries:
        print(
            f"{e.run_id:<{width}}  {e.created_at:<20}  {(e.name or '')[:16]:<16} {_metric(e, 'val_acc'):>7} "
            f"{_metric(e, 'test_acc'):>8}  {(e.dataset_fingerprint or '-')[:12]:<12}  "
            f"{(e.cache_key or '-')[:12]:<12}  {_lineage(e)}".rstrip()
        )
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    with Registry(args.registry, create=False) as registry:
        entry = registry.get(args.run_id)
    print(json.dumps(entry.to_json(), indent=2, sort_keys=True, default=str))
    return 0


def cmd_runs_diff(args: argparse.Namespace) -> int:
    with Registry(args.registry, create=False) as registry:
        a, b = registry.get(args.run_a), registry.get(args.run_b)
    print(f"--- {a.run_id}\n+++ {b.run_id}")
    sections = [
        ("config", differences(a.config, b.config)),
        ("metrics", differences(result_metrics(a.metrics), result_metrics(b.metrics))),
        (
            "identity",
            differences(
                {
                    "seed": a.seed,
                    "dataset_fingerprint": a.dataset_fingerprint,
                    "cache_keys": a.cache_keys,
                    "project_commit": a.project_commit,
                    "runtime": a.runtime,
                },
                {
                    "seed": b.seed,
                    "dataset_fingerprint": b.dataset_fingerprint,
                    "cache_keys": b.cache_keys,
                    "project_commit": b.project_commit,
                    "runtime": b.runtime,
                },
            ),
        ),
        ("versions", differences(a.versions, b.versions)),
    ]
    for title, diffs in sections:
        if not diffs:
            print(f"{title}: same")
            continue
        print(f"{title}:")
        width = max(len(key) for key, _, _ in diffs)
        for key, left, right in diffs:
            print(f"  {key:<{width}}  {_show(left)} -> {_show(right)}")
    print(f"(timings not compared: {', '.join(sorted(TIMING_METRICS))})")
    return 0


# ---------------------------------------------------------------------------------------------- stages


def _extract(prep: Prepared, ray_address: str | None, progress: bool) -> tuple[bool, float]:
    """Build (or find) every cache the config needs: (all were hits, seconds spent)."""
    from pipeline import cli

    if hasattr(cli, "do_extract_all"):  # configs with several backbones
        results = list(cli.do_extract_all(prep, ray_address, progress).values())
    else:
        results = [cli.do_extract(prep, ray_address, progress)]
    return all(r.cache_hit for r in results), sum(r.seconds for r in results)


def _validate(raw: dict[str, Any], what: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise UniptError(
            f"the config stored for {what} no longer validates ({where}: {problem['msg']}); "
            "rerun it with the unipt version that made it"
        ) from exc


def cmd_rerun(args: argparse.Namespace) -> int:
    from pipeline import cli

    started = time.perf_counter()
    progress = not args.no_progress
    with Registry(args.registry, create=False) as registry:
        old = registry.get(args.run_id)
    raw = json.loads(json.dumps(old.config))
    raw.setdefault("storage", {})["registry"] = args.registry  # the new run joins the old one's registry
    if old.runtime.get("device") == "cpu" and raw.get("train", {}).get("device", "auto") == "auto":
        import torch

        if torch.cuda.is_available():
            # The original trained on CPU; "auto" would pick this GPU and change the numbers.
            raw.setdefault("train", {})["device"] = "cpu"
    prep = cli.prepare(_validate(raw, f"run {old.run_id}"))

    extra: dict[str, Any] = {"rerun_of": old.run_id}
    new_fp = prep.dataset.fingerprint
    if new_fp != old.dataset_fingerprint:
        if not args.allow_new_data:
            raise UniptError(
                f"dataset {prep.dataset.source} changed since run {old.run_id}: its fingerprint was "
                f"{old.dataset_fingerprint}, now {new_fp}; restore the original data, or pass "
                "--allow-new-data to train on the new data as a new run linked to the old one"
            )
        extra = {
            "parent_run_id": old.run_id,
            "data_changed": {"old_fingerprint": old.dataset_fingerprint, "new_fingerprint": new_fp},
        }
        _say(
            f"dataset changed (fingerprint {old.dataset_fingerprint[:12]} -> {new_fp[:12]}): "
            f"training on the new data as a new run linked to {old.run_id}"
        )
    elif prep.key != old.cache_key:
        changed = [key for key, _, _ in differences(old.cache_key_fields, prep.key_fields)]
        if not args.allow_new_data:
            raise UniptError(
                f"run {old.run_id} used cache {old.cache_key}, this machine gives {prep.key} for its "
                f"config (changed: {', '.join(changed) or 'cache key fields'}); restore the original "
                "backbone files, or pass --allow-new-data to run anyway as a new run linked to the old one"
            )
        extra = {"parent_run_id": old.run_id, "cache_changed": changed}
        _say(f"cache inputs changed ({', '.join(changed)}): a new run linked to {old.run_id}")

    cache_hit, extract_seconds = _extract(prep, args.ray_address, progress)
    train_started = time.perf_counter()
    with cli.torch_threads(old.runtime.get("torch_threads")):
        trained = cli.do_train(prep, progress)
    timings = {
        "extract_s": round(extract_seconds, 3),
        "train_s": round(time.perf_counter() - train_started, 3),
        "total_s": round(time.perf_counter() - started, 3),
    }
    run_dir = cli._record(prep, trained, cache_hit, timings, extra)
    cli._summary(trained, cache_hit, timings, run_dir)

    diffs = differences(result_metrics(old.metrics), result_metrics(trained["metrics"]))
    if not diffs:
        print(f"metrics match run {old.run_id} exactly ({len(result_metrics(old.metrics))} values)")
        return 0
    verdict = "differ from" if "rerun_of" in extra else "on the new data, compared with"
    print(f"metrics {verdict} run {old.run_id}:")
    for key, before, after in diffs:
        print(f"  {key}: {_show(before)} -> {_show(after)}")
    return 1 if "rerun_of" in extra else 0


# ---------------------------------------------------------------------------------------------- sweep


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """``["train.lr=1e-3,5e-4"]`` -> ``{"train.lr": ["1e-3", "5e-4"]}``; only ``train.*`` settings."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise UniptError(f"--grid {spec!r} is not KEY=V1,V2,...; write it like --grid train.lr=1e-3,5e-4")
        section, _, field = key.partition(".")
        if section != "train" or "." in field:
            raise UniptError(
                f"--grid {key}: only train.* settings can be swept, so every trial reuses one cache; "
                f"set {key} with --set and run one sweep per value"
            )
        if field not in TrainConfig.model_fields:
            raise UniptError(
                f"--grid {key}: no such training setting; choose from {', '.join(TrainConfig.model_fields)}"
            )
        if key in grid:
            raise UniptError(f"--grid {key} is given twice; list all its values in one --grid")
        parts = [v.strip() for v in values.split(",")]
        if not all(parts):
            raise UniptError(f"--grid {spec!r} has an empty value; separate values with single commas")
        grid[key] = parts
    return grid


def train_trial(prep: Prepared, threads: int) -> dict[str, Any]:
    """One sweep trial, run as a Ray task: train from the cache with this task's CPU share."""
    import torch

    from pipeline.cli import do_train

    torch.set_num_threads(threads)
    started = time.perf_counter()
    trained = do_train(prep, progress=False)
    trained["train_s"] = round(time.perf_counter() - started, 3)
    return trained


def _ray_root_cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc.__cause__ or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline import cli

    started = time.perf_counter()
    grid = parse_grid(args.grid)
    if args.parallel is not None and args.parallel < 1:
        raise UniptError(f"--parallel {args.parallel}: give 1 or more trials at a time")
    base = cli._load(args)
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    configs = [
        cli._load(argparse.Namespace(**{**vars(args), "set": [*(args.set or []), *_overrides(c)]}))
        for c in combos
    ]
    prep = cli.prepare(base)

    import ray
    import torch  # noqa: F401  (before ray.init: see extract/runner.py)
    from ray.exceptions import RayError

    import extract.worker  # noqa: F401  (likewise)

    started_ray = not ray.is_initialized()
    if started_ray:  # one Ray session for the extraction and the trials
        ray.init(address=args.ray_address, include_dashboard=False, logging_level="WARNING")
    sweep_id = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    try:
        cache_hit, extract_seconds = _extract(prep, args.ray_address, not args.no_progress)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        parallel = min(args.parallel or cpus, len(configs))
        share = max(1, cpus // parallel)
        _say(
            f"{sweep_id}: {len(configs)} trials on cache {prep.key}, {parallel} at a time, "
            f"{share} CPU(s) each"
        )
        task = ray.remote(train_trial).options(num_cpus=share)
        pending: dict[Any, int] = {}
        queue = list(range(len(configs)))
        results: list[tuple[int, str, dict[str, Any]]] = []
        while queue or pending:
            while queue and len(pending) < parallel:
                i = queue.pop(0)
                trial_prep = dataclasses.replace(prep, config=configs[i])
                pending[task.remote(trial_prep, share)] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                trained = ray.get(done[0])
            except RayError as exc:
                raise UniptError(
                    f"sweep trial {_describe(combos[i])} failed in a Ray worker: {_ray_root_cause(exc)}; "
                    f"finished trials are registered under sweep {sweep_id}"
                ) from exc
            timings = {
                "extract_s": round(extract_seconds, 3),
                "train_s": trained.pop("train_s"),
                "total_s": round(time.perf_counter() - started, 3),
            }
            params = {key: _value(configs[i], key) for key in grid}
            sweep = {"id": sweep_id, "trial": i, "trials": len(configs), "params": params}
            run_dir = cli._record(
                dataclasses.replace(prep, config=configs[i]), trained, True, timings, {"sweep": sweep}
            )
            m = trained["metrics"]
            _say(
                f"trial {len(results) + 1}/{len(configs)} {_describe(params)}: val_acc {m['val_acc']:.4f} "
                f"test_acc {m['test_acc']:.4f} -> {run_dir.name}"
            )
            results.append((i, run_dir.name, trained["metrics"]))
    finally:
        if started_ray:
            ray.shutdown()

    _table(sweep_id, grid, configs, results)
    print(
        f"{sweep_id}: {len(results)} runs from one cache ({'cache hit' if cache_hit else 'extracted once'}) "
        f"in {time.perf_counter() - started:.1f}s; `unipt runs ls --sweep {sweep_id}` lists them"
    )
    return 0


def _overrides(combo: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in combo.items()]


def _value(config: ExperimentConfig, dotted: str) -> Any:
    return getattr(config.train, dotted.partition(".")[2])


def _describe(params: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in params.items())


def _val_order(metrics: dict[str, Any]) -> tuple[int, float]:
    value = metrics.get("val_acc")
    if not isinstance(value, (int, float)) or math.isnan(value):
        return (1, 0.0)  # trials without a validation score go last
    return (0, -value)


def _table(
    sweep_id: str,
    grid: dict[str, list[str]],
    configs: list[ExperimentConfig],
    results: list[tuple[int, str, dict[str, Any]]],
) -> None:
    rows = sorted(results, key=lambda r: (_val_order(r[2]), r[0]))
    columns = ["rank", "run_id", *grid, "val_acc", "test_acc", "best_epoch"]
    body = [
        [
            str(rank),
            run_id,
            *(_show(_value(configs[i], key)) for key in grid),
            f"{metrics.get('val_acc', float('nan')):.4f}",
            f"{metrics.get('test_acc', float('nan')):.4f}",
            str(metrics.get("best_epoch", "-")),
        ]
        for rank, (i, run_id, metrics) in enumerate(rows, start=1)
    ]
    widths = [max(len(row[c]) for row in [columns, *body]) for c in range(len(columns))]
    for row in [columns, *body]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


# ---------------------------------------------------------------------------------------------- parser


def add_runs_commands(
    sub: argparse._SubParsersAction,
    experiment: Callable[[str, str, Callable[[argparse.Namespace], int]], argparse.ArgumentParser],
) -> None:
    """Add ``runs``, ``rerun`` and ``sweep``; ``experiment`` makes a parser with the config options."""
    registry_help = f"SQLite run registry (default: {DEFAULT_REGISTRY})"
    runs = sub.add_parser(
        "runs",
        help="list, show and compare registered runs",
        description="list, show and compare registered runs",
    )
    actions = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")

    def action(
        name: str, help_text: str, handler: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--registry", default=DEFAULT_REGISTRY, help=registry_help)
        p.set_defaults(handler=handler)
        return p

    ls = action("ls", "list registered runs, oldest first: id, metrics, dataset, cache, lineage", cmd_runs_ls)
    ls.add_argument("--sweep", help="only this sweep's trials")
    ls.add_argument("--limit", type=int, help="only the last N runs")
    show = action(
        "show",
        "one run as JSON: config, cache keys, seed, versions, commit, metrics, artifacts",
        cmd_runs_show,
    )
    show.add_argument("run_id", help="a run id or a unique prefix of one")
    diff = action(
        "diff", "the config keys, metrics and identities that differ between two runs", cmd_runs_diff
    )
    diff.add_argument("run_a", help="a run id (or unique prefix)")
    diff.add_argument("run_b", help="a run id (or unique prefix)")

    rerun = sub.add_parser(
        "rerun",
        help="redo a registered run from its stored config and check its metrics match exactly",
        description="redo a registered run: reload its dataset (refused if the data changed), rebuild "
        "the cache if it was removed, train, register a new run, and compare the metrics",
    )
    rerun.add_argument("run_id", help="a run id or a unique prefix of one")
    rerun.add_argument("--registry", default=DEFAULT_REGISTRY, help=registry_help)
    rerun.add_argument(
        "--allow-new-data",
        action="store_true",
        help="run even if the dataset (or the backbone files) changed, as a new run linked to the old one",
    )
    rerun.add_argument("--ray-address", help="join this Ray cluster to rebuild a cache (default: local)")
    rerun.add_argument("--no-progress", action="store_true", help="hide progress bars")
    rerun.set_defaults(handler=cmd_rerun)

    sweep = experiment(
        "sweep",
        "train a grid of UniPT settings from one cache, trials in parallel on Ray; each is a registered run",
        cmd_sweep,
    )
    sweep.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="train.KEY=V1,V2",
        help="values of one train.* setting (repeatable; the trials are every combination)",
    )
    sweep.add_argument("--parallel", type=int, help="trials at a time (default: one per Ray CPU)")
    sweep.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
