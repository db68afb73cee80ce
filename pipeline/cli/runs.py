"""``unipt runs ls|show|diff|register`` and ``unipt rerun ID``.

``runs`` reads the run registry (:mod:`unipt.pipeline.runs.registry`); ``rerun`` calls its recipe
(:mod:`unipt.pipeline.experiment.rerun`) and prints what it returns. ``unipt sweep`` is
:mod:`unipt.pipeline.cli.sweep`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unipt.pipeline.cli.common import print_json, print_summary, show_value
from unipt.pipeline.errors import CacheMissing, UniptError
from unipt.pipeline.runs.compare import TIMING_METRICS, differences, result_metrics
from unipt.pipeline.runs.registration import read_finished_record, register_run
from unipt.pipeline.runs.registry import DEFAULT_REGISTRY, Registry, RunEntry
from unipt.pipeline.tasks import get_task, headline_of, task_names


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
            print(f"  {key:<{width}}  {show_value(left)} -> {show_value(right)}")
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
        print(f"  {key}: {show_value(before)} -> {show_value(after)}")
    return 1 if result.is_rerun else 0


# ---------------------------------------------------------------------------------------------- parser


_REGISTRY_HELP = f"SQLite run registry (default: {DEFAULT_REGISTRY})"


def add_runs_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``runs`` (its actions: ``ls``, ``show``, ``diff``, ``register``) and ``rerun``."""
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
        p.add_argument("--registry", default=DEFAULT_REGISTRY, help=_REGISTRY_HELP)
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
    _add_rerun_command(sub)


def _add_rerun_command(sub: argparse._SubParsersAction) -> None:
    rerun = sub.add_parser(
        "rerun",
        help="redo a registered run from its stored config and check its metrics match exactly",
        description="redo a registered run: reload its dataset (refused if the data changed), rebuild "
        "the cache if it was removed, train, register a new run, and compare the metrics",
    )
    rerun.add_argument("run_id", help="a run id or a unique prefix of one")
    rerun.add_argument("--registry", default=DEFAULT_REGISTRY, help=_REGISTRY_HELP)
    rerun.add_argument(
        "--allow-new-data",
        action="store_true",
        help="run even if the dataset (or the backbone files) changed, as a new run linked to the old one",
    )
    rerun.add_argument("--ray-address", help="join this Ray cluster to rebuild a cache (default: local)")
    rerun.add_argument("--no-progress", action="store_true", help="hide progress bars")
    rerun.set_defaults(handler=cmd_rerun)
