"""``unipt sweep CONFIG --grid ... | --sample ...``: the flags read into trials and distributions, the
recipe (:mod:`unipt.pipeline.experiment.sweep`) called, and its trials printed as a table."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from unipt.pipeline.cli.common import load_args, show_value
from unipt.pipeline.cli.model import load_config_or_cache
from unipt.pipeline.config.compat import current_key
from unipt.pipeline.errors import UniptError
from unipt.pipeline.storage import DEFAULT_REGISTRY, DEFAULT_RUNS_ROOT

if TYPE_CHECKING:  # the sweep recipe imports zarr and torch: the handlers import it
    from unipt.pipeline.experiment.sweep import SweepResult
    from unipt.pipeline.experiment.trials import Distribution, Trial


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """``["train.lr=1e-3,5e-4"]`` -> ``{"train.lr": ["1e-3", "5e-4"]}``; only ``train.*`` settings."""
    from unipt.pipeline.config import TrainConfig, parse_value

    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = current_key(key.strip())
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
    from unipt.pipeline.experiment.trials import Trial

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
    from unipt.pipeline.experiment.trials import DISTRIBUTIONS, Distribution

    example = "--sample train.lr=loguniform:1e-4:1e-2 (or uniform:A:B, randint:A:B, choice:V1:V2)"
    samples: dict[str, Distribution] = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = current_key(key.strip())
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
    from unipt.pipeline.experiment.trials import describe

    name = result.headline

    def number(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) else "-"

    columns = ["rank", "run_id", *keys, f"val_{name}", f"test_{name}", "best_epoch", "cpus", "gpus", "status"]
    body = [
        [
            str(rank),
            trial.run_id or "-",
            *(show_value(trial.params.get(key, "-")) for key in keys),
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


def add_sweep_command(
    sub: argparse._SubParsersAction, experiment: Callable[..., argparse.ArgumentParser]
) -> None:
    """Add ``sweep``; ``experiment`` makes a parser with the config options."""
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
