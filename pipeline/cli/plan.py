"""``unipt plan CONFIG``: what a cache will cost before it is built (the recipe is
:mod:`unipt.pipeline.experiment.plan`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from unipt.pipeline.cli.common import load_args
from unipt.pipeline.experiment.plan_sample import SAMPLE_EXAMPLES


def cmd_plan(args: argparse.Namespace) -> int:
    from unipt.pipeline import experiment
    from unipt.pipeline.experiment import plan as planning

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
        records=False,
    )
    p.add_argument(
        "--sample",
        type=int,
        default=SAMPLE_EXAMPLES,
        help=f"examples to extract and time (default {SAMPLE_EXAMPLES})",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
