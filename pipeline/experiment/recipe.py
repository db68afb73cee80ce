"""The recipe: unipt's Python API, and the one module (with the CLI) that drives both stages.

Read top to bottom, a job is::

    prep = prepare(config)               # dataset -> fingerprint; backbones -> identities -> cache keys
                                         # (or prepare_for_cache(path): all of it from a cache alone)
    extract_all(prep)                    # stage 1: each backbone's cache, built once (a hit costs nothing)
    trained = train(prep)                # stage 2: the task's model from the cache(s); no backbone
    run_dir = record(prep, trained, ...) # run record, plots, the run registry

:func:`run` is exactly that, with timings and resume; :func:`train_from_cache` is the same without
stage 1. Results are dataclasses. Progress goes to the ``unipt`` logger (:mod:`unipt.pipeline.log`).
Stage 1 (``extract``) is imported lazily, so training never loads Ray or a backbone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.cache.identity import BackboneIdentity, backbone_identity, cache_key, cache_key_fields
from unipt.pipeline.cache.integrity import check_examples_match, check_label_range
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.provenance import (
    CACHE_SOURCE,
    backbone_is_here,
    data_is_here,
    dataset_from_cache,
    identity_difference,
    identity_from_cache,
    key_fields_of,
    key_of,
    setting_conflicts,
)
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.config import BackboneConfig, ExperimentConfig
from unipt.pipeline.data.table import DatasetTable, load_dataset
from unipt.pipeline.errors import UniptError
from unipt.pipeline.experiment.cache_config import (
    config_for_cache as config_for_cache,  # the API: a cache's own config
)
from unipt.pipeline.experiment.cache_config import config_from_cache
from unipt.pipeline.extras import has, install_hint
from unipt.pipeline.log import human_bytes, say, utc_timestamp
from unipt.pipeline.model.files import ModelSpec, describe_model, write_model
from unipt.pipeline.model.mlflow_export import log_pyfunc_model
from unipt.pipeline.runs.records import (
    RECORD_FILE,
    check_run_id,
    finite_record,
    new_run_id,
    package_versions,
    project_commit,
    read_run_record,
    write_run_record,
)
from unipt.pipeline.runs.registered import check_registered
from unipt.pipeline.runs.registry import ready_registry, register_run, registry_id
from unipt.pipeline.runs.tracking import Tracker
from unipt.pipeline.tasks import TaskInfo, get_task

if TYPE_CHECKING:
    from unipt.extract.runner import ExtractionResult
    from unipt.extract.spec import BackboneLoadSpec
    from unipt.train.fit import StepHook


# ---------------------------------------------------------------------------------------------- prepare


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
    # An explicit cache (Zarr path/URL or .h5) this was prepared for: training reads it, not the key's
    # location, and the primary backbone's key and key fields are that cache's own.
    cache: str | None = None

    @property
    def task(self) -> TaskInfo:
        return get_task(self.config.train.task)

    @property
    def primary(self) -> PreparedBackbone:
        return next(iter(self.backbones.values()))

    @property
    def key(self) -> str:
        """The primary backbone's cache key: what single-cache training reads."""
        return self.primary.key

    @property
    def key_fields(self) -> dict[str, Any]:
        return self.primary.key_fields

    def training_backbones(self) -> list[PreparedBackbone]:
        """The backbones whose caches the task trains on, in the task's order (retrieval: query, gallery)."""
        if self.task.caches == 1:
            return [self.primary]
        return [self.backbones[name] for name in self.config.retrieval_pair]


def prepare(config: ExperimentConfig) -> Prepared:
    """Load and fingerprint the dataset, identify every backbone, and derive each one's cache key."""
    dataset = load_dataset(config.dataset, task=config.train.task)
    dataset.check_splits()  # before any extraction: an empty val or test split would only give NaNs
    backbones = {}
    for name, backbone_config in config.named_backbones.items():
        identity = backbone_identity(backbone_config)
        fields = cache_key_fields(dataset.fingerprint, identity, backbone_config, config.extract)
        backbones[name] = PreparedBackbone(name, backbone_config, identity, fields, cache_key(fields))
    root = CacheRoot(config.storage.cache_root, config.storage.options)
    return Prepared(config, dataset, backbones, root)


def prepare_for_cache(
    cache: str, config: ExperimentConfig | None = None, overrides: list[str] | None = None
) -> Prepared:
    """Prepare to train from one cache (Zarr path/URL or .h5), needing nothing but the cache.

    Without ``config`` it comes from the cache's attributes with ``train.*`` defaults and ``overrides``.
    The dataset and the backbone are checked against the cache when this machine has them (a cache built
    for other data or another backbone is refused); when it has not, their identities are the cache's.
    A config that disagrees with the cache on a setting that decides its bytes is refused either way.
    """
    options = config.storage.options if config is not None else None
    reader = open_cache(cache, options=options)
    try:
        if config is None:
            config = config_from_cache(reader, overrides)
        name, settings = next(iter(config.named_backbones.items()))
        if data_is_here(config):
            dataset = load_dataset(config.dataset, task=config.train.task)
        else:
            dataset = dataset_from_cache(reader, config.dataset.source)
            if not config.dataset.source.startswith(CACHE_SOURCE):
                say(f"dataset {config.dataset.source} is not here: using the cache's labels, splits and "
                    f"fingerprint {dataset.fingerprint[:12]} (not re-checked)")  # fmt: skip
        here = backbone_is_here(settings)
        identity = backbone_identity(settings) if here else identity_from_cache(reader)
        fields = key_fields_of(reader)
        backbone = PreparedBackbone(name, settings, identity, fields, key_of(reader))
        root = CacheRoot(config.storage.cache_root, config.storage.options)
        prep = Prepared(config, dataset, {name: backbone}, root, cache=str(cache))
        check_cache_matches(prep, reader, backbone_checked=here)
        return prep
    finally:
        release_reader(reader)


def check_cache_matches(prep: Prepared, reader: ActivationCache, backbone_checked: bool = True) -> None:
    """Refuse a cache built for other data, another backbone, or other byte-deciding settings."""
    source = reader.source
    conflicts = setting_conflicts(prep.config, reader)
    if conflicts:
        setting, mine, theirs = conflicts[0]
        raise UniptError(
            f"cache {source} was built with {setting} {_shown(theirs)}, the config says {_shown(mine)}; "
            f"drop {setting} (the cache decides it) or extract a cache with it"
        )
    cached_fp = reader.attrs.get("dataset_fingerprint") or key_fields_of(reader).get("dataset_fingerprint")
    if prep.dataset.fingerprint != cached_fp:
        raise UniptError(
            f"cache {source} was built for another dataset (fingerprint {str(cached_fp)[:12]}, the config's "
            f"data has {prep.dataset.fingerprint[:12]}); re-extract for this config"
        )
    if backbone_checked:
        difference = identity_difference(prep.primary.identity, key_fields_of(reader)["backbone"])
        if difference:
            raise UniptError(
                f"cache {source} was built with another backbone than {prep.primary.config.name_or_path} "
                f"({difference}); re-extract for this config"
            )


def release_reader(reader: ActivationCache) -> None:
    """Let go of a reader's leases (Zarr) or file (HDF5): :meth:`ActivationCache.close`."""
    reader.close()


def _shown(value: Any) -> str:
    return str(value).replace(" ", "")


# ---------------------------------------------------------------------------------------------- extract


def extract_all(
    prep: Prepared, *, ray_address: str | None = None, progress: bool = True
) -> dict[str, ExtractionResult]:
    """Every backbone's cache, each extracted once (a cache hit costs nothing)."""
    return {name: extract(prep, name, ray_address=ray_address, progress=progress) for name in prep.backbones}


def extract(
    prep: Prepared, backbone: str | None = None, *, ray_address: str | None = None, progress: bool = True
) -> ExtractionResult:
    """Build (or find) one backbone's cache; the primary backbone's when ``backbone`` is None."""
    # Imported here so training never loads the extraction stack.
    from unipt.extract.runner import ExtractionRequest, run_extraction

    target = prep.backbones[backbone] if backbone is not None else prep.primary
    settings = target.config
    label = f" [{target.name}]" if len(prep.backbones) > 1 else ""
    hit_before = prep.cache_root.has(target.key)
    if hit_before:
        say(
            f"cache hit {target.key}{label}: reusing {prep.cache_root.location(target.key)} "
            "(no backbone forward pass)"
        )
    else:
        # Not "cache miss" yet: a view over activations its space already holds extracts nothing (and
        # is recorded as a hit); which of the two it was is said once the extraction knows.
        counts = prep.dataset.split_counts()
        say(
            f"no cache {target.key}{label} yet: a view of {len(prep.dataset)} examples "
            f"(train {counts['train']}, val {counts['val']}, test {counts['test']}) "
            f"with {settings.name_or_path}"
        )
    name = settings.name_or_path
    request = ExtractionRequest(
        key=target.key,
        key_fields=target.key_fields,
        cache_root=prep.cache_root,
        examples=prep.dataset.table,
        label_names=prep.dataset.label_names,
        load_spec=load_spec(target, prep.config.extract.autocast),
        backbone=settings,
        extract=prep.config.extract,
        backbone_name=name,
    )
    result = run_extraction(request, ray_address=ray_address, progress=progress)
    if result.cache_hit and not hit_before:
        say(
            f"cache {target.key}{label}: view written over existing activations, nothing extracted "
            f"(recorded as a cache hit) -> {result.path}"
        )
    if not result.cache_hit:
        resumed = ""
        if result.shards_resumed:  # the tokens and bytes above are this run's shards only
            shards = result.shards_resumed + result.shards_run
            resumed = f", {result.shards_resumed} of {shards} shards resumed (tokens and bytes: this run's)"
        stats = result.stats
        workers = f"{result.workers}"
        if result.shards_run and result.workers_used < result.workers:  # some never ran a shard: say so
            workers = f"{result.workers_used} of {result.workers}"
        say(
            f"cache miss {target.key}{label}: extracted {result.examples} examples, {result.tokens} tokens, "
            f"{human_bytes(result.bytes_written)} written in {result.seconds:.1f}s "
            f"({stats.get('forward_s', 0):.1f}s backbone, {stats.get('write_s', 0):.1f}s writes overlapped) "
            f"on {workers} worker(s){resumed} -> {result.path}"
        )
    return result


def load_spec(target: PreparedBackbone, autocast: str, device: str = "auto") -> BackboneLoadSpec:
    """How a worker (or ``unipt plan``) loads ``target``: exactly the files its identity hashed."""
    from unipt.extract.spec import load_spec_for

    return load_spec_for(target.config, target.identity, autocast, device)


# ---------------------------------------------------------------------------------------------- train


def open_for_training(
    prep: Prepared, cache: str | None = None, backbone: str | None = None
) -> ActivationCache:
    """A backbone's cache (by key; the primary's by default) or an explicit path/URL/.h5 file; refused if
    built for other data or another backbone."""
    target = prep.backbones[backbone] if backbone is not None else prep.primary
    expect = {"dataset_fingerprint": prep.dataset.fingerprint, "backbone": target.key_fields["backbone"]}
    order = prep.config.train.view_order
    if cache is None:
        return open_cache(prep.cache_root.location(target.key), expect=expect, view_order=order)
    return open_cache(cache, expect=expect, options=prep.config.storage.options, view_order=order)


def require_caches(prep: Prepared, how_to_build: str) -> None:
    """Refuse to train when a cache the task needs was never extracted (``how_to_build`` is the fix)."""
    for backbone in prep.training_backbones():
        if not prep.cache_root.has(backbone.key):
            raise UniptError(
                f"no cache {backbone.key} for this config under {prep.cache_root}; {how_to_build}"
            )
        say(f"cache hit {backbone.key}: training from it (no backbone forward pass)")


@dataclass
class Trained:
    """What training produced, everything the run record and the summary need."""

    task: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    layer_weights: list[float]
    layer_names: list[str]
    cache_source: str  # the (first) cache read
    cache_bytes: int  # on disk, every cache read
    # Backbone name -> the root digest of the cache read for it (None for an HDF5 copy): what the run
    # record and the registry keep, so that a later read of a changed cache is refused.
    root_digests: dict[str, str | None] = field(default_factory=dict)
    gallery_layer_weights: list[float] | None = None  # two-cache tasks: the second side's weights
    runtime: dict[str, Any] = field(default_factory=dict)  # device and torch threads: what a rerun restores
    model_state: dict[str, Any] | None = None  # the best epoch's weights (UniPT and head), on the CPU
    model_spec: ModelSpec | None = None  # what model.json says about them
    select_metric: str | None = None  # the validation metric that picked the best epoch
    report: dict[str, Any] | None = None  # per split: per-class scores, confusion matrix (classification)
    warnings: list[str] = field(default_factory=list)  # e.g. a model that predicts one class

    @property
    def headline(self) -> str:
        return get_task(self.task).headline


def train(
    prep: Prepared,
    cache: ActivationCache | str | None = None,
    *,
    progress: bool = True,
    checkpoint: Path | None = None,
    resume: Path | None = None,
    meta: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    built: frozenset[str] = frozenset(),
    on_step: StepHook | None = None,
) -> Trained:
    """Train the config's task from its cache(s): by key, or ``cache`` (a reader, path, URL or .h5 file).

    ``checkpoint`` is written after every epoch; ``resume`` continues from one. Before training, each cache
    is compared with the dataset table and, unless this command just extracted it (its key is in
    ``built``), with the root digests registered runs recorded for its key
    (:mod:`unipt.pipeline.cache.integrity`).
    ``on_step``: a :class:`unipt.train.fit.StepHook`, the loss every few optimiser steps.
    """
    from unipt.train.tasks import TrainOptions

    task = prep.task
    backbones = prep.training_backbones()
    cache = cache if cache is not None else prep.cache
    if cache is not None and task.caches > 1:
        raise UniptError(
            f"task {task.name} trains on {task.caches} caches found by key; --cache does not apply to it"
        )
    # The readers opened here are closed here (their leases let go); a reader passed in is the caller's.
    with ExitStack() as opened:
        if cache is None:
            readers = [opened.enter_context(open_for_training(prep, backbone=b.name)) for b in backbones]
        elif isinstance(cache, ActivationCache):
            readers = [cache]
        else:
            readers = [opened.enter_context(open_for_training(prep, cache))]
        for backbone, reader in zip(backbones, readers, strict=False):
            check_examples_match(prep.dataset, reader)
            if task.label_kind != "numeric":
                check_label_range(reader)
            if backbone.key not in built:
                check_registered(prep.config.storage.registry, backbone.key, reader)
        return _train_on(
            prep, readers, backbones, TrainOptions(progress, checkpoint, resume, meta, on_epoch_end, on_step)
        )


def extraction_runtime(readers: list[ActivationCache]) -> dict[str, list[str]]:
    """Where and in what precision the rows a run trained on were computed, from each segment's own record
    (``devices``, ``autocast``, ``compute_dtype``; distinct values over every segment read): a run cannot
    hide that its cache was extracted on the CPU. Empty for caches written before extraction recorded it.
    """
    merged: dict[str, set[str]] = {}
    for reader in readers:
        for segment in getattr(reader, "segments", None) or [reader]:
            extraction = getattr(segment, "attrs", {}).get("extraction") or {}
            for field_name in ("devices", "autocast", "compute_dtype"):
                value = extraction.get(field_name)
                if value is not None:
                    values = value if isinstance(value, list) else [value]
                    merged.setdefault(field_name, set()).update(str(v) for v in values)
    return {name: sorted(values) for name, values in merged.items()}


def _train_on(
    prep: Prepared, readers: list[ActivationCache], backbones: list[PreparedBackbone], options: Any
) -> Trained:
    import torch

    from unipt.train.fit import device_reason, pick_device
    from unipt.train.metrics import collapse_warnings
    from unipt.train.tasks import run_task

    task = prep.task
    device = pick_device(prep.config.train.device)
    reason = device_reason(prep.config.train.device, device)
    say(f"training on {reason}")
    result = run_task(task, readers, prep.config.train, prep.config.seed, options)
    prefix = (lambda name: f"{name} ") if task.caches > 1 else (lambda name: "")
    return Trained(
        task=task.name,
        metrics=dict(result.metrics),
        history=result.history,
        layer_weights=result.layer_weights,
        layer_names=weighted_layer_names(readers[0].layers, result.layer_weights, prefix(backbones[0].name)),
        cache_source=readers[0].source,
        cache_bytes=sum(reader.nbytes_on_disk() for reader in readers),
        root_digests={b.name: reader.root_digest() for b, reader in zip(backbones, readers, strict=False)},
        gallery_layer_weights=result.gallery_layer_weights,
        select_metric=result.select_metric,
        report=result.report,
        warnings=collapse_warnings(result.metrics, result.report, result.select_metric),
        # CPU results depend on the thread count (reduction order), so a rerun restores it.
        runtime={
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "device_reason": reason,  # e.g. "cpu (no GPU visible)": a silent CPU fallback shows
            "amp": result.amp,  # the autocast dtype train.amp resolved to on this device
            **({"extraction": extracted} if (extracted := extraction_runtime(readers)) else {}),
        },
        model_state=(
            {name: value.detach().cpu() for name, value in result.model.state_dict().items()}
            if result.model is not None
            else None
        ),
        model_spec=model_spec(prep, readers[0]),
    )


def model_spec(prep: Prepared, reader: ActivationCache) -> ModelSpec:
    """``model.json`` of a model trained on ``reader`` (two-cache tasks: the query side's)."""
    task = prep.task
    target = None
    if task.label_kind == "numeric":  # the regression head standardises targets by the train split
        labels = reader.labels()[reader.split_indices("train")]
        target = {"mean": float(labels.mean()), "std": float(labels.std()) or 1.0}
    grids = {layer: list(reader.layer_spec(layer).grid or []) for layer in reader.layers}
    return describe_model(
        reader.attrs,
        reader.layers,
        reader.hidden_sizes,
        {layer: grid for layer, grid in grids.items() if grid},
        reader.label_names,
        reader.layout.max_length,
        reader.dtype,
        prep.config,
        1 if task.label_kind == "numeric" else len(reader.label_names),
        target,
    )


def weighted_layer_names(layers: list[int], weights: list[float], prefix: str = "") -> list[str]:
    """Names for a model's per-layer weights: UniPT weighs the layers beside its anchor (all but the
    last); the other methods (scalar mix, LST, the probe) weigh every layer."""
    named = layers[:-1] if len(weights) == len(layers) - 1 else layers
    return [f"{prefix}layer {layer}" for layer in named]


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


# ---------------------------------------------------------------------------------------------- record


@dataclass
class Timings:
    extract_s: float
    train_s: float
    total_s: float

    def as_dict(self) -> dict[str, float]:
        return {"extract_s": self.extract_s, "train_s": self.train_s, "total_s": self.total_s}


def timings_since(started: float, train_started: float, extract_s: float) -> Timings:
    now = time.perf_counter()
    return Timings(round(extract_s, 3), round(now - train_started, 3), round(now - started, 3))


def record(
    prep: Prepared,
    trained: Trained,
    cache_hit: bool,
    timings: Timings,
    extra: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> Path:
    """Write the run record and plots, register the run; ``extra`` adds lineage (rerun_of, sweep, ...).

    ``run_id``: the id chosen before training (its directory may already hold the run's checkpoint).
    """
    from unipt.train.plots import write_report_plots, write_run_plots

    config = prep.config.model_dump(mode="json")
    doc = {
        "run_id": run_id or new_run_id({"config": config, "cache_key": prep.key}),
        "created_at": utc_timestamp(),
        "config": config,
        "seed": prep.config.seed,
        "task": {"name": trained.task, "headline": trained.headline, "select_metric": trained.select_metric},
        "dataset": {
            "source": prep.dataset.source,
            "fingerprint": prep.dataset.fingerprint,
            "num_examples": len(prep.dataset),
            "splits": prep.dataset.split_counts(),
            "label_names": prep.dataset.label_names,
            "class_counts": prep.dataset.class_counts(),
            "split_scheme": prep.dataset.split_scheme,
            "duplicates": prep.dataset.duplicates,
        },
        "cache": {
            "key": prep.key,
            "key_fields": prep.key_fields,
            "path": trained.cache_source,
            "hit": cache_hit,
            "bytes_on_disk": trained.cache_bytes,
            "root_digest": trained.root_digests.get(prep.primary.name),
        },
        "backbones": {
            name: {
                "name_or_path": b.config.name_or_path,
                "cache_key": b.key,
                **({"root_digest": trained.root_digests[name]} if trained.root_digests.get(name) else {}),
            }
            for name, b in prep.backbones.items()
        },
        "metrics": trained.metrics,
        **({"report": trained.report} if trained.report else {}),
        **({"warnings": trained.warnings} if trained.warnings else {}),
        "history": trained.history,
        "layer_weights": trained.layer_weights,
        # Two-cache tasks: the gallery side's UniPT weights beside the query side's.
        **({"gallery_layer_weights": trained.gallery_layer_weights} if trained.gallery_layer_weights else {}),
        "timings": timings.as_dict(),
        "versions": package_versions(),
        "project_commit": project_commit(),
        "runtime": trained.runtime,
        # Where the run registers itself: a later command registers it there if it stopped before that.
        "registry": registry_id(prep.config.storage.registry),
        **(extra or {}),
    }
    # Strict JSON: an undefined metric (a correlation of constant predictions) is null, with the reason.
    doc = finite_record(doc)
    run_dir = write_run_record(prep.config.storage.runs_root, doc)
    if trained.model_state is not None and trained.model_spec is not None:
        # The product of the run: the best epoch's model, loadable without the checkpoint or the run.
        spec = dataclasses.replace(
            trained.model_spec,
            metrics=dict(trained.metrics),
            warnings=list(trained.warnings or []),
            run_id=doc["run_id"],
        )
        write_model(run_dir, trained.model_state, spec)
    names = trained.layer_names or [f"#{i}" for i in range(len(trained.layer_weights))]
    if has("matplotlib"):
        write_run_plots(
            run_dir, trained.history, trained.layer_weights, names, metric=get_task(trained.task).val_metric
        )
        write_report_plots(run_dir, trained.report)
    else:  # a lean install trains and records all the same; only the pictures need the [plots] extra
        hint = install_hint("matplotlib")
        say(f"plots skipped: matplotlib is not installed ({hint}); record.json has the numbers")
    register_run(prep.config.storage.registry, doc, run_dir)
    return run_dir


# ---------------------------------------------------------------------------------------------- recipes


@dataclass
class RunResult:
    run_dir: Path
    trained: Trained
    timings: Timings
    cache_hit: bool

    @property
    def run_id(self) -> str:
        return self.run_dir.name


def run(
    prep: Prepared, *, ray_address: str | None = None, progress: bool = True, resume: str | None = None
) -> RunResult:
    """The whole job: extract every backbone's cache (or reuse it), train, record."""
    started = time.perf_counter()
    finished = _ready_to_record(prep, resume)
    if finished is not None:
        return finished
    extractions = extract_all(prep, ray_address=ray_address, progress=progress)
    # Each result holds a read lease taken before its build lock was let go: `unipt cache gc` cannot
    # remove a cache between its extraction and the end of training.
    with leased(extractions):
        cache_hit = all(result.cache_hit for result in extractions.values())
        extract_s = sum(result.seconds for result in extractions.values())
        built = built_keys(prep, extractions)
        return _train_and_record(
            prep, started, extract_s, cache_hit, progress=progress, resume=resume, built=built
        )


def built_keys(prep: Prepared, extractions: dict[str, ExtractionResult]) -> frozenset[str]:
    """Keys of the caches these extractions wrote (misses): new content, not yet read by any run."""
    return frozenset(prep.backbones[name].key for name, result in extractions.items() if not result.cache_hit)


@contextmanager
def leased(extractions: dict[str, ExtractionResult]) -> Iterator[None]:
    """Hold the extractions' read leases for the block, then let `unipt cache gc` see them again."""
    try:
        yield
    finally:
        for result in extractions.values():
            result.release()


def train_from_cache(
    prep: Prepared, cache: str | None = None, *, progress: bool = True, resume: str | None = None
) -> RunResult:
    """Train and record from caches that exist (by key, or ``cache``); never runs a backbone."""
    started = time.perf_counter()
    finished = _ready_to_record(prep, resume)
    if finished is not None:
        return finished
    cache = cache if cache is not None else prep.cache
    if cache is None:
        require_caches(prep, "run `unipt extract CONFIG` first (or `unipt run`)")
        reader = None
    else:
        reader = open_cache(
            cache, options=prep.config.storage.options, view_order=prep.config.train.view_order
        )
        if prep.cache != str(cache):
            # The run records the key of the cache it reads, never the config's: rerun and gc rely on it.
            check_cache_matches(prep, reader)
            primary = dataclasses.replace(prep.primary, key=key_of(reader), key_fields=key_fields_of(reader))
            prep = dataclasses.replace(prep, backbones={primary.name: primary}, cache=str(cache))
        say(f"training from {reader.source} (no backbone forward pass)")
    with ExitStack() as opened:
        if reader is not None:
            opened.enter_context(reader)
        return _train_and_record(prep, started, 0.0, True, progress=progress, resume=resume, cache=reader)


def _train_and_record(
    prep: Prepared,
    started: float,
    extract_s: float,
    cache_hit: bool,
    *,
    progress: bool,
    resume: str | None,
    cache: ActivationCache | None = None,
    built: frozenset[str] = frozenset(),
) -> RunResult:
    from unipt.train.checkpoint import CHECKPOINT_FILE

    train_started = time.perf_counter()
    run_id, resume_from = run_to_continue(prep, resume)
    checkpoint_root = prep.config.train.checkpoint_dir or prep.config.storage.runs_root
    checkpoint = Path(checkpoint_root).expanduser() / run_id / CHECKPOINT_FILE
    if resume_from is not None:
        say(f"resuming run {run_id} from {resume_from}")
    tracker = start_tracking(prep, run_id)
    try:
        # A resumed run keeps the thread count its first epochs ran with, so it ends where it would have.
        with torch_threads(checkpoint_threads(resume_from) if resume_from is not None else None):
            import torch

            meta = {"run_id": run_id, "torch_threads": torch.get_num_threads()}
            trained = train(
                prep,
                cache,
                progress=progress,
                checkpoint=checkpoint,
                resume=resume_from,
                meta=meta,
                on_epoch_end=tracker.epoch if tracker.enabled else None,
                built=built,
                on_step=tracker.step_hook(),
            )
        timings = timings_since(started, train_started, extract_s)
        extra = {"tracking": tracker.ids()} if tracker.enabled else None
        run_dir = record(prep, trained, cache_hit, timings, extra=extra, run_id=run_id)
    except BaseException:
        tracker.fail()
        raise
    tracker.finish(run_dir, trained.history, trained.metrics)
    return RunResult(run_dir, trained, timings, cache_hit)


def start_tracking(prep: Prepared, run_id: str) -> Tracker:
    """The run's tracking sinks (``tracking:`` in the config), opened with the config as params and the
    dataset fingerprint and cache key as tags; a tracker that does nothing when no sink is set."""
    tracker = Tracker(prep.config.tracking, run_id, log_model=log_pyfunc_model)
    if tracker.enabled:
        tags = {"dataset_fingerprint": prep.dataset.fingerprint, "cache_key": prep.key}
        if len(prep.backbones) > 1:
            tags.update({f"cache_key.{b.name}": b.key for b in prep.backbones.values()})
        tracker.start(prep.config, tags)
    return tracker


def _ready_to_record(prep: Prepared, resume: str | None) -> RunResult | None:
    """Before any extraction or training: the registry is opened and checked (a read-only, damaged or
    locked one fails now, not after the work), and runs that finished without registering are registered.
    Resuming such a run gives its recorded result (None otherwise: the work is to be done)."""
    storage = prep.config.storage
    registered = ready_registry(storage.registry, storage.runs_root)
    if resume is None:
        return None
    run_id, _ = _run_of_checkpoint(resume)
    run_dir = Path(storage.runs_root).expanduser() / run_id
    if not (run_dir / RECORD_FILE).exists():
        return None
    if run_id not in registered:
        raise UniptError(
            f"run {run_id} already finished (it has a {RECORD_FILE}) and is registered; nothing to resume: "
            f"`unipt runs show {run_id}` shows it"
        )
    say(
        f"run {run_id} had finished (its {RECORD_FILE} is written) but stopped before registering itself; "
        f"it is registered in {storage.registry} now; nothing left to train"
    )
    return recorded_result(run_dir)


def recorded_result(run_dir: Path) -> RunResult:
    """A finished run's result as its record.json holds it (no model state: that is in model.json)."""
    doc = read_run_record(run_dir)
    try:
        trained = Trained(
            task=doc["task"]["name"],
            metrics=dict(doc["metrics"]),
            history=list(doc.get("history") or []),
            layer_weights=list(doc.get("layer_weights") or []),
            layer_names=[],
            cache_source=str(doc["cache"]["path"]),
            cache_bytes=int(doc["cache"]["bytes_on_disk"]),
            gallery_layer_weights=doc.get("gallery_layer_weights"),
            runtime=dict(doc.get("runtime") or {}),
            select_metric=doc["task"].get("select_metric"),
            report=doc.get("report"),
        )
        took = doc["timings"]
        timings = Timings(float(took["extract_s"]), float(took["train_s"]), float(took["total_s"]))
        return RunResult(run_dir, trained, timings, bool(doc["cache"]["hit"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise UniptError(
            f"run record {run_dir / RECORD_FILE} lacks {exc} or holds the wrong type there; it was edited "
            f"or is not unipt's: `unipt runs show {run_dir.name}` shows what the registry has"
        ) from exc


def _run_of_checkpoint(resume: str) -> tuple[str, Path]:
    """(run id, checkpoint file) of ``--resume RUN_DIR_OR_CHECKPOINT``."""
    from unipt.train.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(resume)
    return check_run_id(load_checkpoint(path).get("meta", {}).get("run_id") or path.parent.name), path


def run_to_continue(prep: Prepared, resume: str | None) -> tuple[str, Path | None]:
    """(run id, checkpoint to resume from): a fresh id, or the interrupted run's own id and checkpoint."""
    if resume is None:
        config = prep.config.model_dump(mode="json")
        return new_run_id({"config": config, "cache_key": prep.key}), None
    run_id, path = _run_of_checkpoint(resume)
    if (Path(prep.config.storage.runs_root).expanduser() / run_id / RECORD_FILE).exists():
        raise UniptError(f"run {run_id} already finished (it has a {RECORD_FILE}); nothing to resume")
    return run_id, path


def checkpoint_threads(checkpoint: Path) -> int | None:
    """The torch thread count a checkpoint's epochs ran with (None if it does not say)."""
    from unipt.train.checkpoint import load_checkpoint

    threads = load_checkpoint(checkpoint).get("meta", {}).get("torch_threads")
    return int(threads) if isinstance(threads, int) and threads > 0 else None
