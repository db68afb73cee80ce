"""``unipt plan CONFIG``: what a cache will cost before it is built (the recipe is :mod:`pipeline.plan`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from pipeline import experiment
from pipeline import plan as planning
from pipeline.cli_common import load_args


def cmd_plan(args: argparse.Namespace) -> int:
    prep = experiment.prepare(load_args(args))
    result = planning.plan(
        prep, sample=args.sample, ray_address=args.ray_address, progress=not args.no_progress
    )
    print(json.dumps(result.as_dict(), indent=2) if args.json else "\n".join(result.lines()), flush=True)
    return 0


def add_plan_command(
    sub: argparse._SubParsersAction, experiment_parser: Callable[..., argparse.ArgumentParser]
) -> None:
    """Add ``plan``; ``experiment_parser`` makes a parser with the config options."""
    p = experiment_parser(
        "plan",
        "predict the cache size per dtype, extraction and epoch time on this machine, the free space at "
        "storage.cache_root, and whether caching pays off against online training (from a timed sample)",
        cmd_plan,
    )
    p.add_argument(
        "--sample",
        type=int,
        default=planning.SAMPLE_EXAMPLES,
        help=f"examples to extract and time (default {planning.SAMPLE_EXAMPLES})",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
