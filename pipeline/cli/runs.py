"""``unipt runs ls|show|diff``, ``unipt rerun ID`` and ``unipt sweep CONFIG --grid ...``.

``runs`` reads the run registry (:mod:`unipt.pipeline.runs.registry`); ``rerun`` and ``sweep`` call their
recipes
(:mod:`unipt.pipeline.experiment.rerun`, :mod:`unipt.pipeline.experiment.sweep`) and print what they return.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unipt.pipeline.cli.common import load_args, print_json, print_summary
from unipt.pipeline.cli.model import load_config_or_cache
from unipt.pipeline.errors import CacheMissing, UniptError
from unipt.pipeline.runs.registry import (
    DEFAULT_REGISTRY,
    TIMING_METRICS,
    Registry,
    RunEntry,
    differences,
    read_finished_record,
    register_run,
    result_metrics,
)
from unipt.pipeline.storage import DEFAULT_RUNS_ROOT
from unipt.pipeline.tasks import get_task, headline_of, task_names

if TYPE_CHECKING:  # rerun and sweep import the recipe (zarr, torch): their handlers import them
    from unipt.pipeline.experiment.sweep import Distribution, SweepResult, Trial


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value


def _metric(entry: RunEntry, name: str) -> str:
    value = entry.metrics.get(name)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _headline(entry: RunEntry) -> str | None:
    """The headline metric of the run's task (from its config); records without one: by their metrics."""
    task = (entry.config.get("train") or {}).get("task", "classification")
    return get_task(task).headline if task in task_names() else headline_of(entry.metrics)


def _lineage(entry: RunEntry) -> str:
    if entry.rerun_of:
        return f"rerun of {entry.rerun_of}"
    if entry.parent_run_id:
        return f"new data, from {entry.parent_run_id}"
    if entry.sweep_id:
        return f"sweep {entry.sweep_id}"
    return ""


def _listed(entry: RunEntry) -> dict[str, Any]:
    """One run as `runs ls --json` lists it: what the table shows, with every result metric."""
    name = _headline(entry)
    return {
        "run_id": entry.run_id,
        "created_at": entry.created_at,
        "name": entry.name,
        "headline": name,
        "val": entry.metrics.get(f"val_{name}"),
        "test": entry.metrics.get(f"test_{name}"),
        "metrics": result_metrics(entry.metrics),
        "dataset_fingerprint": entry.dataset_fingerprint,
        "cache_key": entry.cache_key,
        "rerun_of": entry.rerun_of,
        "parent_run_id": entry.parent_run_id,
        "sweep_id": entry.sweep_id,
        "sweep_params": entry.sweep_params,
    }


def cmd_runs_ls(args: argparse.Namespace) -> int:
    if not Path(args.registry).expanduser().exists():
        print(f"no runs registered yet in {args.registry}", file=sys.stderr)
        if args.json:
            print_json([])
        return 0
    with Registry(args.registry, create=False) as registry:
        entries = registry.list(sweep_id=args.sweep, limit=args.limit)
    if args.json:
        print_json([_listed(e) for e in entries])
        return 0
    if not entries:
        print(
            f"no runs in {args.registry}" + (f" for sweep {args.sweep}" if args.sweep else ""),
            file=sys.stderr,
        )
        return 0
    width = max(len(e.run_id) for e in entries)
    # Each run shows its own task's headline metric (accuracy, Pearson, rSum, ...).
    print(
        f"{'run_id':<{width}}  {'created_at':<20}  {'name':<16} {'metric':<8} {'val':>7} {'test':>7}  "
        f"{'dataset':<12}  {'cache':<12}  lineage"
    )
    for e in entries:
        name = _headline(e) or "-"
        print(
            f"{e.run_id:<{width}}  {e.created_at:<20}  {(e.name or '')[:16]:<16} {name:<8} "
            f"{_metric(e, f'val_{name}'):>7} {_metric(e, f'test_{name}'):>7}  "
            f"{(e.dataset_fingerprint or '-')[:12]:<12}  {(e.cache_key or '-')[:12]:<12}  "
            f"{_lineage(e)}".rstrip()
        )
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    with Registry(args.registry, create=False) as registry:
        entry = registry.get(args.run_id)
    if args.split:
        ids = split_example_ids(entry, args.split)
        if args.json:
            print_json(ids)
        else:
            print("\n".join(ids))
        return 0
    # JSON either way (--json is accepted for symmetry with the other listing commands).
    print_json(entry.to_json())
    return 0


SPLITS = ("train", "val", "test")


def split_example_ids(entry: RunEntry, split: str) -> list[str]:
    """The example ids of one split of a run, in the dataset's order, read from the run's training cache
    (the view it trained on): what its val/test metrics were computed over, so `unipt evaluate` on those
    rows can be checked against the run."""
    from unipt.pipeline.cache.opener import open_cache
    from unipt.pipeline.cache.root import CacheRoot

    storage = entry.config.get("storage") or {}
    recorded = entry.artifacts.get("cache")
    candidates = [recorded] if recorded and recorded != "None" else []
    if entry.cache_key and storage.get("cache_root"):
        candidates.append(str(CacheRoot(storage["cache_root"]).location(entry.cache_key)))
    for location in candidates:
        try:
            reader = open_cache(location)
        except CacheMissing:
            continue  # removed (gc) or moved: try where the run's config says the cache root is
        with reader:
            examples = reader.examples
            if "example_id" not in examples.column_names:
                raise UniptError(f"the cache {location} of run {entry.run_id} stores no example ids")
            splits = examples.column("split").to_numpy(zero_copy_only=False)
            ids = examples.column("example_id").to_pylist()
            return [str(ids[i]) for i in (splits == split).nonzero()[0]]
    raise UniptError(
        f"run {entry.run_id}'s cache {entry.cache_key} is not at "
        f"{' or '.join(candidates) or 'a known place'} any more (removed by `unipt cache gc`?); "
        f"`unipt rerun {entry.run_id}` rebuilds it"
    )


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


def cmd_runs_register(args: argparse.Namespace) -> int:
    """Register finished runs by their folders: those stopped between record.json and registration."""
    for folder in args.run_dirs:
        run_dir = Path(folder).expanduser()
        record = read_finished_record(run_dir)
        with Registry(args.registry) as registry:
            known = record["run_id"] in registry.run_ids()
        if known:
            print(f"run {record['run_id']} is already in {args.registry}; nothing to do")
            continue
        register_run(args.registry, record, run_dir)
        print(f"registered run {record['run_id']} from {run_dir / 'record.json'} in {args.registry}")
    return 0


# ---------------------------------------------------------------------------------------------- rerun


def cmd_rerun(args: argparse.Namespace) -> int:
    from unipt.pipeline.experiment.rerun import rerun

    result = rerun(
        args.run_id,
        args.registry,
        allow_new_data=args.allow_new_data,
        ray_address=args.ray_address,
        progress=not args.no_progress,
    )
    print_summary(result.new)
    old = result.old
    if result.matches:
        print(f"metrics match run {old.run_id} exactly ({len(result_metrics(old.metrics))} values)")
        return 0
    print(
        f"metrics {'differ from' if result.is_rerun else 'on the new data, compared with'} run {old.run_id}:"
    )
    for key, before, after in result.differences:
        print(f"  {key}: {_show(before)} -> {_show(after)}")
    return 1 if result.is_rerun else 0


# ---------------------------------------------------------------------------------------------- sweep


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """``["train.lr=1e-3,5e-4"]`` -> ``{"train.lr": ["1e-3", "5e-4"]}``; only ``train.*`` settings."""
    from unipt.pipeline.config import TrainConfig, parse_value

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
        for part in parts:
            parse_value(part, f"--grid {key}", f"--grid {key}=1e-3,5e-4")
        grid[key] = parts
    return grid


def grid_trials(args: argparse.Namespace, grid: dict[str, list[str]]) -> list[Trial]:
    """One trial per combination of the grid's values, each config loaded with its overrides."""
    from unipt.pipeline.experiment.sweep import Trial

    trials = []
    for values in itertools.product(*grid.values()):
        combo = dict(zip(grid, values, strict=True))
        overrides = [*(args.set or []), *(f"{key}={value}" for key, value in combo.items())]
        config = load_config_or_cache(argparse.Namespace(**{**vars(args), "set": overrides}))
        trials.append(Trial({key: getattr(config.train, key.partition(".")[2]) for key in grid}, config))
    return trials


def parse_samples(specs: list[str]) -> dict[str, Distribution]:
    """``["train.lr=loguniform:1e-4:1e-2"]`` -> ``{"train.lr": Distribution("loguniform", (1e-4, 1e-2))}``."""
    from unipt.pipeline.config import parse_value
    from unipt.pipeline.experiment.sweep import DISTRIBUTIONS, Distribution

    example = "--sample train.lr=loguniform:1e-4:1e-2 (or uniform:A:B, randint:A:B, choice:V1:V2)"
    samples: dict[str, Distribution] = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        kind, _, rest = text.partition(":")
        if not sep or kind not in DISTRIBUTIONS or not rest:
            raise UniptError(f"--sample {spec!r} is not KEY=KIND:ARGS; write it like {example}")
        parse_grid([f"{key}=0"])  # the same rules for the key as --grid
        if key in samples:
            raise UniptError(f"--sample {key} is given twice; give it once")
        args = tuple(_numeric(parse_value(v.strip(), f"--sample {key}", example)) for v in rest.split(":"))
        numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        if kind != "choice" and (len(args) != 2 or not numeric or not args[0] < args[1]):
            raise UniptError(
                f"--sample {spec!r}: {kind} takes two numbers LOW:HIGH with LOW < HIGH; {example}"
            )
        if kind == "loguniform" and args[0] <= 0:
            raise UniptError(f"--sample {spec!r}: loguniform needs LOW > 0")
        samples[key] = Distribution(kind, args)
    return samples


def _numeric(value: Any) -> Any:
    """YAML reads ``1e-3`` as text (it wants ``1.0e-3``); a bound written so is still a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def cmd_sweep(args: argparse.Namespace) -> int:
    from unipt.pipeline.experiment.sweep import Search, resume_sweep, sweep

    if args.resume:
        storage = load_args(args).storage if args.config else None
        runs_root = args.runs_root or (storage.runs_root if storage else DEFAULT_RUNS_ROOT)
        registry = args.registry or (storage.registry if storage else DEFAULT_REGISTRY)
        result = resume_sweep(
            args.resume,
            runs_root,
            registry=registry,
            ray_address=args.ray_address,
            progress=not args.no_progress,
        )
        keys = list(result.results[0].params) if result.results else []
    else:
        grid = parse_grid(args.grid or [])
        samples = parse_samples(args.sample or [])
        if not grid and not samples:
            raise UniptError(
                "a sweep needs --grid train.KEY=V1,V2 or --sample train.KEY=KIND:ARGS (or --resume)"
            )
        if args.parallel is not None and args.parallel < 1:
            raise UniptError(f"--parallel {args.parallel}: give 1 or more trials at a time")
        if args.search == "optuna" and not samples:
            raise UniptError("--search optuna needs at least one --sample distribution to search")
        base = load_config_or_cache(args)
        result = sweep(
            base,
            grid_trials(args, grid) if grid else [],
            search=Search(samples, args.samples, args.search),
            parallel=args.parallel,
            gpus_per_trial=args.gpus_per_trial,
            early_stop=args.early_stop,
            ray_address=args.ray_address,
            progress=not args.no_progress,
            cache=args.cache,
        )
        keys = [*grid, *samples]
    _table(result, keys)
    finished = sum(r.status == "finished" for r in result.results)
    print(
        f"{result.sweep_id}: {finished} of {len(result.results)} trials finished as runs from one cache "
        f"({'cache hit' if result.cache_hit else 'extracted once'}) in {result.seconds:.1f}s; "
        f"`unipt runs ls --sweep {result.sweep_id}` lists them"
    )
    return 0


def _table(result: SweepResult, keys: list[str]) -> None:
    """The trials, finished ones by best validation headline metric first; then stopped and failed ones,
    each failure's cause below the table."""
    from unipt.pipeline.experiment.sweep import describe

    name = result.headline

    def number(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) else "-"

    columns = ["rank", "run_id", *keys, f"val_{name}", f"test_{name}", "best_epoch", "cpus", "gpus", "status"]
    body = [
        [
            str(rank),
            trial.run_id or "-",
            *(_show(trial.params.get(key, "-")) for key in keys),
            number(trial.metrics.get(f"val_{name}")),
            number(trial.metrics.get(f"test_{name}")),
            str(trial.metrics.get("best_epoch", "-")),
            f"{trial.resources.get('CPU', 0):g}",
            f"{trial.resources.get('GPU', 0):g}",
            trial.status if trial.status != "stopped" else f"stopped@{trial.epochs}",
        ]
        for rank, trial in enumerate(result.results, start=1)
    ]
    widths = [max(len(row[c]) for row in [columns, *body]) for c in range(len(columns))]
    for row in [columns, *body]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for rank, trial in enumerate(result.results, start=1):
        if trial.error:
            print(f"trial {rank} ({describe(trial.params)}) failed: {trial.error}")


# ---------------------------------------------------------------------------------------------- parser


def add_runs_commands(
    sub: argparse._SubParsersAction,
    experiment: Callable[..., argparse.ArgumentParser],
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
    ls.add_argument("--json", action="store_true", help="print the runs as a JSON list on stdout")
    show = action(
        "show",
        "one run as JSON: config, cache keys, seed, versions, commit, metrics, artifacts; or, with "
        "--split, the example ids of one split",
        cmd_runs_show,
    )
    show.add_argument("run_id", help="a run id or a unique prefix of one")
    show.add_argument(
        "--split",
        choices=SPLITS,
        help="list the example ids of this split (one per line; --json: a JSON list), read from the run's "
        "cache: the rows its val/test metrics were computed on",
    )
    show.add_argument("--json", action="store_true", help="strict JSON (the default for the whole run)")
    diff = action(
        "diff", "the config keys, metrics and identities that differ between two runs", cmd_runs_diff
    )
    diff.add_argument("run_a", help="a run id (or unique prefix)")
    diff.add_argument("run_b", help="a run id (or unique prefix)")
    register = action(
        "register",
        "register finished runs by their folders (a run stopped after writing record.json but before "
        "registering itself); `unipt run` and `unipt train` also do this for their runs root",
        cmd_runs_register,
    )
    register.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run folder holding record.json")

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
        "train UniPT settings (a grid, sampled draws, optional ASHA early stopping) from one cache as Ray "
        "Tune trials, each with a CPU share and a GPU share when there are GPUs; each is a registered run",
        cmd_sweep,
        optional_config=True,
    )
    sweep.add_argument(
        "--cache",
        help="sweep on this cache (Zarr path/URL or .h5 file) instead of extracting; CONFIG is then optional",
    )
    sweep.add_argument(
        "--grid",
        action="append",
        metavar="train.KEY=V1,V2",
        help="values of one train.* setting (repeatable; the trials are every combination)",
    )
    sweep.add_argument(
        "--sample",
        action="append",
        metavar="train.KEY=KIND:ARGS",
        help="a sampled train.* setting: uniform:LOW:HIGH, loguniform:LOW:HIGH, randint:LOW:HIGH or "
        "choice:V1:V2:... (repeatable), drawn --samples times per grid point",
    )
    sweep.add_argument("--samples", type=int, default=1, help="draws of the --sample settings (default 1)")
    sweep.add_argument(
        "--search", choices=("random", "optuna"), default="random", help="how --sample draws (default random)"
    )
    sweep.add_argument("--parallel", type=int, help="trials at a time (default: one per Ray CPU)")
    sweep.add_argument(
        "--gpus-per-trial",
        type=float,
        help="GPU (fraction) each trial asks Ray for (default: cluster GPUs / --parallel; 0 without GPUs)",
    )
    sweep.add_argument(
        "--early-stop",
        choices=("asha", "none"),
        default="none",
        help="asha: stop trials whose validation score trails at an epoch milestone (default none)",
    )
    sweep.add_argument(
        "--resume", metavar="SWEEP_ID", help="continue an interrupted sweep (keeps finished trials)"
    )
    sweep.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
