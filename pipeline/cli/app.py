"""The ``unipt`` command line: parses arguments, calls the recipe (:mod:`unipt.pipeline.experiment.recipe`),
prints.

Everything a command does lives in the recipe modules; here are only flags, the summary line and the
one-line error contract (``unipt: error: <what>; <what to do>``, exit 2).

Building the parser imports no torch, Ray, transformers or zarr (``unipt --help`` and ``unipt runs ls``
start at once): each command imports the recipe it runs in its handler. tests/test_architecture.py checks.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from unipt.pipeline.cli.cache import add_cache_commands
from unipt.pipeline.cli.common import load_args, print_summary
from unipt.pipeline.cli.model import add_model_commands, prepare_train
from unipt.pipeline.cli.plan import add_plan_command
from unipt.pipeline.cli.runs import add_runs_commands
from unipt.pipeline.cli.sweep import add_sweep_command
from unipt.pipeline.errors import UniptError
from unipt.pipeline.extras import missing_extra_message
from unipt.pipeline.log import configure_cli_logging
from unipt.pipeline.storage import explain_storage_error


def cmd_run(args: argparse.Namespace) -> int:
    from unipt.pipeline import experiment
    from unipt.pipeline.experiment.plan import check_space

    prep = experiment.prepare(load_args(args))
    check_space(prep, force=args.force, ray_address=args.ray_address, progress=not args.no_progress)
    result = experiment.run(
        prep, ray_address=args.ray_address, progress=not args.no_progress, resume=args.resume
    )
    print_summary(result)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from unipt.pipeline import experiment
    from unipt.pipeline.experiment.plan import check_space

    prep = experiment.prepare(load_args(args))
    check_space(prep, force=args.force, ray_address=args.ray_address, progress=not args.no_progress)
    extractions = experiment.extract_all(prep, ray_address=args.ray_address, progress=not args.no_progress)
    for result in extractions.values():
        result.release()  # nothing reads the caches in this command
    for backbone in prep.backbones.values():
        print(prep.cache_root.location(backbone.key))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from unipt.pipeline import experiment

    result = experiment.train_from_cache(
        prepare_train(args), progress=not args.no_progress, resume=args.resume
    )
    print_summary(result)
    return 0


# `unipt --help`'s closing lines: a command of each kind, with what it does.
_EXAMPLES = (
    "examples:\n"
    "  unipt run configs/rt_minilm.yaml                      # extract if needed, train, record\n"
    "  unipt run configs/rt_minilm.yaml --set train.epochs=3 # override any config value\n"
    "  unipt plan configs/rt_minilm.yaml                     # cache size, times, free disk\n"
    "  unipt extract configs/rt_minilm.yaml --ray-address auto  # extract on a running Ray cluster\n"
    "  unipt train configs/rt_minilm.yaml                    # tune again from the cache only\n"
    "  unipt train --cache run.h5 --set train.lr=5e-4        # a cache alone: no data, no backbone\n"
    "  unipt predict RUN_ID --text 'a fine film'             # the tuned model on raw inputs\n"
    "  unipt cache ls                                        # list committed caches\n"
    "  unipt cache verify KEY                                # check every chunk's checksum\n"
    "  unipt cache gc --yes                                  # remove caches no run uses\n"
    "  unipt runs ls                                         # registered runs, newest last\n"
    "  unipt rerun RUN_ID                                    # redo a run; check the metrics match\n"
    "  unipt sweep CONFIG --grid train.lr=1e-3,5e-4          # a grid of trials on one cache (Ray)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unipt",
        description=(
            "UniPT from activation caches: extract a frozen backbone's hidden states once "
            "(Ray -> Zarr), then tune UniPT on them as often as you like, with no backbone in memory."
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    experiment = functools.partial(_experiment_command, sub)
    _add_stage_commands(experiment)
    add_cache_commands(sub)
    add_model_commands(sub)
    add_runs_commands(sub)
    add_sweep_command(sub, experiment)
    add_plan_command(sub, experiment)
    return parser


def _experiment_command(
    sub: argparse._SubParsersAction,
    name: str,
    help_text: str,
    handler: Callable[[argparse.Namespace], int],
    optional_config: bool = False,
    records: bool = True,
) -> argparse.ArgumentParser:
    """A command that reads a config; ``records``: it writes run records (so takes --runs-root and
    --registry), which `plan` and `extract` do not."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    if optional_config:  # with --cache, the cache's own attributes are the config
        p.add_argument("config", nargs="?", help="experiment YAML (optional with --cache)")
    else:
        p.add_argument("config", help="experiment YAML, e.g. configs/rt_minilm.yaml")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )
    p.add_argument("--cache-root", help="directory of activation caches (default: storage.cache_root)")
    if records:
        p.add_argument("--runs-root", help="directory of run records (default: storage.runs_root)")
        p.add_argument("--registry", help="SQLite run registry (default: storage.registry)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(handler=handler)
    return p


def _add_stage_commands(experiment: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``run``, ``extract`` and ``train``; ``experiment`` makes a parser with the config options."""
    run = experiment(
        "run", "extract (or reuse) the cache, train UniPT on it, and write a run record", cmd_run
    )
    run.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    ext = experiment(
        "extract",
        "build the activation cache of every backbone in a config (a no-op for those that exist); "
        "prints one path per backbone",
        cmd_extract,
        records=False,
    )
    ext.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    for command in (run, ext):
        command.add_argument(
            "--force",
            action="store_true",
            help="extract even when the predicted cache size exceeds the free space at the cache root",
        )
    train = experiment(
        "train", "train UniPT from an existing cache; never loads the backbone", cmd_train, True
    )
    train.add_argument(
        "--cache",
        help="train from this cache (a Zarr path/URL or an exported .h5 file); without CONFIG its attributes "
        "are the config (train.* defaults, --set train.KEY=V); needs neither the dataset nor the backbone",
    )
    for command in (run, train):
        command.add_argument(
            "--resume",
            metavar="RUN_DIR_OR_CHECKPOINT",
            help="continue an interrupted run from its last finished epoch (its run directory or "
            "checkpoint.pt); the result is what the uninterrupted run would have given",
        )


def main(argv: list[str] | None = None) -> int:
    import unipt.train  # noqa: F401  (first: it caps malloc arenas before any thread exists: unipt.train.allocator)

    args = build_parser().parse_args(argv)
    if getattr(args, "no_progress", True) is False and not sys.stderr.isatty():
        args.no_progress = True  # a log file gets the unipt: lines, not a bar's cursor escapes
    configure_cli_logging()
    try:
        return args.handler(args)
    except UniptError as exc:
        print(f"unipt: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        # A command that needs an optional extra (Ray, transformers, h5py, ...) on a lean install: name the
        # extra to install. A module no extra provides is a broken install and keeps its traceback.
        message = missing_extra_message(exc, args.command)
        if message is None:
            raise
        print(f"unipt: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:
        # An object store's client raises its own errors from deep inside fsspec and zarr: missing
        # credentials become one line here; anything else is a bug and keeps its traceback.
        problem = explain_storage_error(exc)
        if problem is None:
            raise
        print(f"unipt: error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "unipt: interrupted; finished shards are kept and the next run resumes from them", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
