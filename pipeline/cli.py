"""The ``unipt`` command line: the one place that wires dataset -> extract -> cache -> train -> record."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.bundled import is_bundled
from pipeline.cache import ActivationCache, CacheRoot
from pipeline.cache_open import open_cache
from pipeline.cli_cache import add_cache_commands, human_bytes
from pipeline.cli_runs import add_runs_commands
from pipeline.config import BackboneConfig, ExperimentConfig, load_config
from pipeline.datasets import DatasetTable, load_dataset
from pipeline.errors import UniptError
from pipeline.identity import BackboneIdentity, backbone_identity, cache_key, cache_key_fields
from pipeline.registry import register_run
from pipeline.runs import (
    RECORD_FILE,
    check_run_id,
    new_run_id,
    package_versions,
    project_commit,
    write_run_record,
)

if TYPE_CHECKING:
    from extract.runner import ExtractionResult


@dataclass
class PreparedBackbone:
    """One backbone of a config: its settings, identity, and the cache key it gets on this dataset."""

    name: str
    config: BackboneConfig
    identity: BackboneIdentity
    key_fields: dict[str, Any]
    key: str


@dataclass
class Prepared:
    """What a config resolves to before any stage runs: the data, the backbones and their cache keys."""

    config: ExperimentConfig
    dataset: DatasetTable
    backbones: dict[str, PreparedBackbone]  # the primary first
    cache_root: CacheRoot

    @property
    def primary(self) -> PreparedBackbone:
        return next(iter(self.backbones.values()))

    # The primary backbone's identity and cache: what single-cache training uses.
    @property
    def backbone(self) -> BackboneIdentity:
        return self.primary.identity

    @property
    def key_fields(self) -> dict[str, Any]:
        return self.primary.key_fields

    @property
    def key(self) -> str:
        return self.primary.key


def prepare(config: ExperimentConfig) -> Prepared:
    dataset = load_dataset(config.dataset, task=config.train.task)
    backbones = {}
    for name, backbone_config in config.named_backbones.items():
        identity = backbone_identity(backbone_config)
        fields = cache_key_fields(dataset.fingerprint, identity, backbone_config, config.extract)
        backbones[name] = PreparedBackbone(name, backbone_config, identity, fields, cache_key(fields))
    root = CacheRoot(config.storage.cache_root, config.storage.options)
    return Prepared(config, dataset, backbones, root)


def _say(message: str) -> None:
    print(f"unipt: {message}", file=sys.stderr, flush=True)


def do_extract_all(prep: Prepared, ray_address: str | None, progress: bool) -> dict[str, ExtractionResult]:
    """Every backbone's cache, each extracted once (a cache hit costs nothing)."""
    return {name: do_extract(prep, ray_address, progress, name) for name in prep.backbones}


def do_extract(
    prep: Prepared, ray_address: str | None, progress: bool, backbone: str | None = None
) -> ExtractionResult:
    """Build (or find) one backbone's cache; the primary backbone's when ``backbone`` is None."""
    # Imported here so `unipt train` never loads the extraction stack.
    from extract.runner import ExtractionRequest, run_extraction
    from extract.spec import BackboneLoadSpec

    target = prep.backbones[backbone] if backbone is not None else prep.primary
    settings = target.config
    label = f" [{target.name}]" if len(prep.backbones) > 1 else ""
    if prep.cache_root.has(target.key):
        _say(
            f"cache hit {target.key}{label}: reusing {prep.cache_root.location(target.key)} "
            "(no backbone forward pass)"
        )
    else:
        counts = prep.dataset.split_counts()
        _say(
            f"cache miss {target.key}{label}: extracting {len(prep.dataset)} examples "
            f"(train {counts['train']}, val {counts['val']}, test {counts['test']}) "
            f"with {settings.name_or_path}"
        )
    name = settings.name_or_path
    # Workers may run on other nodes: bundled and hub models are resolved there; local folders go as paths.
    is_local_folder = not is_bundled(name) and Path(name).expanduser().exists()
    load_target = target.identity.local_dir if is_local_folder else name
    request = ExtractionRequest(
        key=target.key,
        key_fields=target.key_fields,
        cache_root=prep.cache_root,
        examples=prep.dataset.table,
        label_names=prep.dataset.label_names,
        load_spec=BackboneLoadSpec(
            load_target,
            settings.revision,
            settings.trust_remote_code,
            autocast=prep.config.extract.autocast,
            allow_pickle=settings.allow_pickle,
        ),
        backbone=settings,
        extract=prep.config.extract,
        backbone_name=name,
    )
    result = run_extraction(request, ray_address=ray_address, progress=progress)
    if not result.cache_hit:
        resumed = f", {result.shards_resumed} shards resumed" if result.shards_resumed else ""
        stats = result.stats
        _say(
            f"extracted{label} {result.examples} examples, {result.tokens} tokens, "
            f"{human_bytes(result.bytes_written)} written in {result.seconds:.1f}s "
            f"({stats.get('forward_s', 0):.1f}s backbone, {stats.get('write_s', 0):.1f}s writes overlapped) "
            f"on {result.workers} worker(s){resumed} -> {result.path}"
        )
    return result


def open_for_training(
    prep: Prepared, cache: str | None = None, backbone: str | None = None
) -> ActivationCache:
    """A backbone's cache (by key; the primary's by default) or an explicit path/URL/.h5 file; refused if
    built for other data or another backbone."""
    target = prep.backbones[backbone] if backbone is not None else prep.primary
    expect = {"dataset_fingerprint": prep.dataset.fingerprint, "backbone": target.key_fields["backbone"]}
    if cache is None:
        return open_cache(prep.cache_root.location(target.key), expect=expect)
    return open_cache(cache, expect=expect, options=prep.config.storage.options)


def _train_retrieval(
    prep: Prepared, progress: bool, checkpoint: Path | None, resume: Path | None, meta: dict[str, Any] | None
) -> dict[str, Any]:
    """Task retrieval: a query and a gallery backbone's caches of one dataset, trained contrastively."""
    from train.retrieval import train_retrieval

    query_name, gallery_name = prep.config.retrieval_pair
    query, gallery = (
        open_for_training(prep, backbone=query_name),
        open_for_training(prep, backbone=gallery_name),
    )
    result = train_retrieval(
        query, gallery, prep.config.train, prep.config.seed, progress, checkpoint, resume, meta
    )
    return {
        "metrics": dict(result.metrics),
        "history": result.history,
        "layer_weights": result.layer_weights,
        "gallery_layer_weights": result.gallery_layer_weights,
        "layer_names": [f"{query_name} layer {layer}" for layer in query.layers[:-1]],
        "cache_bytes": query.nbytes_on_disk() + gallery.nbytes_on_disk(),
        "cache_source": query.source,
        "gallery_cache_source": gallery.source,
    }


def do_train(
    prep: Prepared,
    progress: bool,
    reader: ActivationCache | None = None,
    checkpoint: Path | None = None,
    resume: Path | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train on the primary cache (task retrieval: on the query and gallery backbones' caches);
    ``checkpoint`` is written every epoch, ``resume`` continues one."""
    import torch

    from train.loop import pick_device

    if prep.config.train.task == "retrieval":
        if reader is not None:
            raise UniptError("task retrieval trains on two caches found by key; --cache does not apply to it")
        trained = _train_retrieval(prep, progress, checkpoint, resume, meta)
    else:
        trained = _train_one_cache(
            prep, progress, reader or open_for_training(prep), checkpoint, resume, meta
        )
    # CPU results depend on the thread count (reduction order), so a rerun restores it.
    trained["runtime"] = {
        "torch_threads": torch.get_num_threads(),
        "device": str(pick_device(prep.config.train.device)),
    }
    return trained


def _train_one_cache(
    prep: Prepared,
    progress: bool,
    reader: ActivationCache,
    checkpoint: Path | None,
    resume: Path | None,
    meta: dict[str, Any] | None,
) -> dict[str, Any]:
    from train.loop import train_classifier
    from train.probe import linear_probe

    result = train_classifier(
        reader,
        prep.config.train,
        prep.config.seed,
        progress=progress,
        checkpoint=checkpoint,
        resume=resume,
        meta=meta,
    )
    metrics = dict(result.metrics)
    # The probe is a logistic regression: a baseline for classification only.
    if prep.config.train.linear_probe and prep.config.train.task == "classification":
        metrics.update(linear_probe(reader, prep.config.seed))
    return {
        "metrics": metrics,
        "history": result.history,
        "layer_weights": result.layer_weights,
        "layer_names": [f"layer {layer}" for layer in reader.layers[:-1]],
        "cache_bytes": reader.nbytes_on_disk(),
        "cache_source": reader.source,
    }


def _record(
    prep: Prepared,
    trained: dict[str, Any],
    cache_hit: bool,
    timings: dict[str, float],
    extra: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> Path:
    """Write the run record and register the run; ``extra`` adds lineage (rerun_of, sweep, ...).

    ``run_id``: the id chosen before training (its directory may already hold the run's checkpoint).
    """
    config = prep.config.model_dump(mode="json")
    record = {
        "run_id": run_id or new_run_id({"config": config, "cache_key": prep.key}),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config,
        "seed": prep.config.seed,
        "dataset": {
            "source": prep.dataset.source,
            "fingerprint": prep.dataset.fingerprint,
            "num_examples": len(prep.dataset),
            "splits": prep.dataset.split_counts(),
            "label_names": prep.dataset.label_names,
        },
        "cache": {
            "key": prep.key,
            "key_fields": prep.key_fields,
            "path": trained["cache_source"],
            "hit": cache_hit,
            "bytes_on_disk": trained["cache_bytes"],
        },
        "backbones": {
            name: {"name_or_path": b.config.name_or_path, "cache_key": b.key}
            for name, b in prep.backbones.items()
        },
        "metrics": trained["metrics"],
        "history": trained["history"],
        "layer_weights": trained["layer_weights"],
        # Task retrieval: the gallery side's UniPT weights beside the query side's.
        **(
            {"gallery_layer_weights": trained["gallery_layer_weights"]}
            if "gallery_layer_weights" in trained
            else {}
        ),
        "timings": timings,
        "versions": package_versions(),
        "project_commit": project_commit(),
        "runtime": trained.get("runtime", {}),
        **(extra or {}),
    }
    run_dir = write_run_record(prep.config.storage.runs_root, record)
    _write_plots(run_dir, trained)
    register_run(prep.config.storage.registry, record, run_dir)
    return run_dir


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with this many torch CPU threads, then restore the count: CPU sums (and so exact results)
    depend on it, and reruns or resumes in a long-lived process must not leak it to later work."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_and_record(
    prep: Prepared,
    cache_hit: bool,
    extract_seconds: float,
    started: float,
    progress: bool,
    reader: ActivationCache | None = None,
    resume: str | None = None,
) -> int:
    from train.checkpoint import CHECKPOINT_FILE

    train_started = time.perf_counter()
    run_id, resume_from = _run_to_continue(prep, resume)
    checkpoint_root = prep.config.train.checkpoint_dir or prep.config.storage.runs_root
    checkpoint = Path(checkpoint_root).expanduser() / run_id / CHECKPOINT_FILE
    if resume_from is not None:
        _say(f"resuming run {run_id} from {resume_from}")
    # A resumed run keeps the thread count its first epochs ran with, so it ends where it would have.
    threads = resume_threads(resume_from) if resume_from is not None else None
    with torch_threads(threads):
        trained = do_train(prep, progress, reader, checkpoint, resume_from, meta=_run_meta(run_id))
    timings = {
        "extract_s": round(extract_seconds, 3),
        "train_s": round(time.perf_counter() - train_started, 3),
        "total_s": round(time.perf_counter() - started, 3),
    }
    run_dir = _record(prep, trained, cache_hit, timings, run_id=run_id)
    _summary(trained, cache_hit, timings, run_dir)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    prep = prepare(_load(args))
    extractions = do_extract_all(prep, args.ray_address, not args.no_progress)
    cache_hit = all(result.cache_hit for result in extractions.values())
    seconds = sum(result.seconds for result in extractions.values())
    return _train_and_record(prep, cache_hit, seconds, started, not args.no_progress, resume=args.resume)


def cmd_extract(args: argparse.Namespace) -> int:
    prep = prepare(_load(args))
    do_extract_all(prep, args.ray_address, not args.no_progress)
    for backbone in prep.backbones.values():
        print(prep.cache_root.location(backbone.key))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    prep = prepare(_load(args))
    reader = None
    if args.cache is not None:
        reader = open_for_training(prep, args.cache)
        _say(f"training from {reader.source} (no backbone forward pass)")
    else:
        retrieval = prep.config.train.task == "retrieval"
        needed = (
            [prep.backbones[name] for name in prep.config.retrieval_pair] if retrieval else [prep.primary]
        )
        for backbone in needed:
            if not prep.cache_root.has(backbone.key):
                raise UniptError(
                    f"no cache {backbone.key} for this config under {prep.cache_root}; "
                    f"run `unipt extract {args.config}` first (or `unipt run`)"
                )
            _say(f"cache hit {backbone.key}: training from it (no backbone forward pass)")
    return _train_and_record(prep, True, 0.0, started, not args.no_progress, reader, resume=args.resume)


def _run_to_continue(prep: Prepared, resume: str | None) -> tuple[str, Path | None]:
    """(run id, checkpoint to resume from): a fresh id, or the interrupted run's own id and checkpoint."""
    from train.checkpoint import load_checkpoint, resolve_checkpoint

    if resume is None:
        config = prep.config.model_dump(mode="json")
        return new_run_id({"config": config, "cache_key": prep.key}), None
    path = resolve_checkpoint(resume)
    run_id = check_run_id(load_checkpoint(path).get("meta", {}).get("run_id") or path.parent.name)
    if (Path(prep.config.storage.runs_root).expanduser() / run_id / RECORD_FILE).exists():
        raise UniptError(f"run {run_id} already finished (it has a {RECORD_FILE}); nothing to resume")
    return run_id, path


def _run_meta(run_id: str) -> dict[str, Any]:
    import torch

    return {"run_id": run_id, "torch_threads": torch.get_num_threads()}


def resume_threads(checkpoint: Path) -> int | None:
    from train.checkpoint import load_checkpoint

    threads = load_checkpoint(checkpoint).get("meta", {}).get("torch_threads")
    return int(threads) if isinstance(threads, int) and threads > 0 else None


def _write_plots(run_dir: Path, trained: dict[str, Any]) -> None:
    from train.plots import write_run_plots

    weights = trained.get("layer_weights") or []
    names = trained.get("layer_names") or [f"#{i}" for i in range(len(weights))]
    write_run_plots(run_dir, trained["history"], weights, names)


def _summary(trained: dict[str, Any], cache_hit: bool, timings: dict[str, float], run_dir: Path) -> None:
    m = trained["metrics"]
    probe = f" (linear probe {m['probe_test_acc']:.4f})" if "probe_test_acc" in m else ""
    # The headline metric of the task: accuracy, Pearson correlation (regression) or rSum (retrieval).
    name = next((n for n in ("acc", "pearson", "rsum") if f"test_{n}" in m), "acc")
    print(
        f"test_{name} {m[f'test_{name}']:.4f}{probe} | val_{name} {m[f'val_{name}']:.4f} | "
        f"extract {timings['extract_s']:.1f}s ({'cache hit' if cache_hit else 'cache miss'}) | "
        f"train {m['train_seconds']:.1f}s ({m['seconds_per_epoch']:.1f}s/epoch) | "
        f"cache {human_bytes(trained['cache_bytes'])} | run {run_dir}",
        flush=True,
    )


def _load(args: argparse.Namespace) -> ExperimentConfig:
    overrides = list(args.set or [])
    if args.cache_root:
        overrides.append(f"storage.cache_root={args.cache_root}")
    if args.runs_root:
        overrides.append(f"storage.runs_root={args.runs_root}")
    if args.registry:
        overrides.append(f"storage.registry={args.registry}")
    return load_config(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unipt",
        description=(
            "UniPT from activation caches: extract a frozen backbone's hidden states once "
            "(Ray -> Zarr), then tune UniPT on them as often as you like, with no backbone in memory."
        ),
        epilog=(
            "examples:\n"
            "  unipt run configs/rt_minilm.yaml                      # extract if needed, train, record\n"
            "  unipt run configs/rt_minilm.yaml --set train.epochs=3 # override any config value\n"
            "  unipt extract configs/rt_minilm.yaml --ray-address auto  # extract on a running Ray cluster\n"
            "  unipt train configs/rt_minilm.yaml                    # tune again from the cache only\n"
            "  unipt cache ls                                        # list committed caches\n"
            "  unipt cache verify KEY                                # check every chunk's checksum\n"
            "  unipt cache gc --yes                                  # remove caches no run uses\n"
            "  unipt runs ls                                         # registered runs, newest last\n"
            "  unipt rerun RUN_ID                                    # redo a run; check the metrics match\n"
            "  unipt sweep CONFIG --grid train.lr=1e-3,5e-4          # a grid of trials on one cache (Ray)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def experiment(name: str, help_text: str, handler) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="experiment YAML, e.g. configs/rt_minilm.yaml")
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set train.epochs=3 (repeatable)",
        )
        p.add_argument("--cache-root", help="directory of activation caches (default: storage.cache_root)")
        p.add_argument("--runs-root", help="directory of run records (default: storage.runs_root)")
        p.add_argument("--registry", help="SQLite run registry (default: storage.registry)")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
        p.set_defaults(handler=handler)
        return p

    run = experiment(
        "run", "extract (or reuse) the cache, train UniPT on it, and write a run record", cmd_run
    )
    run.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    ext = experiment(
        "extract",
        "build the activation cache of every backbone in a config (a no-op for those that exist); "
        "prints one path per backbone",
        cmd_extract,
    )
    ext.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    train = experiment("train", "train UniPT from an existing cache; never loads the backbone", cmd_train)
    train.add_argument(
        "--cache",
        help="train from this cache instead of the config's (a Zarr path/URL or an exported .h5 file); "
        "it must have been built from the same dataset and backbone",
    )
    for command in (run, train):
        command.add_argument(
            "--resume",
            metavar="RUN_DIR_OR_CHECKPOINT",
            help="continue an interrupted run from its last finished epoch (its run directory or "
            "checkpoint.pt); the result is what the uninterrupted run would have given",
        )

    add_cache_commands(sub)
    add_runs_commands(sub, experiment)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UniptError as exc:
        print(f"unipt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "unipt: interrupted; finished shards are kept and the next run resumes from them", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
