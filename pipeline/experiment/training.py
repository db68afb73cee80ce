"""Train: stage 2 of :mod:`unipt.pipeline.experiment.recipe`, the config's task from its cache(s), with no
backbone in memory: the caches opened and checked, the task's trainer called with the run's
:class:`unipt.train.fit.TrainOptions`, and what it trained gathered for the record (:class:`Trained`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.cache.integrity import check_examples_match, check_label_range
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.errors import UniptError
from unipt.pipeline.experiment.preparation import Prepared, PreparedBackbone
from unipt.pipeline.log import say
from unipt.pipeline.model.files import ModelSpec, describe_model
from unipt.pipeline.runs.registered import check_registered
from unipt.pipeline.tasks import get_task
from unipt.train.checkpoint import ResumePoint, resume_point
from unipt.train.fit import StepHook, TrainOptions, device_reason, pick_device
from unipt.train.loop import TrainResult
from unipt.train.metrics import collapse_warnings
from unipt.train.tasks import task_trainer


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
    resume: ResumePoint | Path | None = None,
    meta: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    built: frozenset[str] = frozenset(),
    on_step: StepHook | None = None,
) -> Trained:
    """Train the config's task from its cache(s): by key, or ``cache`` (a reader, path, URL or .h5 file).

    ``checkpoint`` is written after every epoch; ``resume`` continues from one (read already, or its file
    or run directory). Before training, each cache is compared with the dataset table and, unless this
    command just extracted it (its key is in ``built``), with the root digests registered runs recorded
    for its key (:mod:`unipt.pipeline.cache.integrity`).
    ``on_step``: a :class:`unipt.train.fit.StepHook`, the loss every few optimiser steps.
    """
    if resume is not None and not isinstance(resume, ResumePoint):
        resume = resume_point(resume)
    options = TrainOptions(progress, checkpoint, resume, meta, on_epoch_end, on_step)
    # The readers opened here are closed here (their leases let go); a reader passed in is the caller's.
    with ExitStack() as opened:
        readers = training_readers(prep, cache, opened, built)
        device = pick_device(prep.config.train.device)
        reason = device_reason(prep.config.train.device, device)
        say(f"training on {reason}")
        result = task_trainer(prep.task)(readers, prep.config.train, prep.config.seed, options)
        return _trained(prep, readers, result, device, reason)


def training_readers(
    prep: Prepared, cache: ActivationCache | str | None, opened: ExitStack, built: frozenset[str]
) -> list[ActivationCache]:
    """The caches the task trains on, in its order: ``cache`` (a reader is the caller's to close) or each
    backbone's by key, opened on ``opened``; each checked against the dataset table and, unless its key
    is in ``built``, against what registered runs read."""
    task = prep.task
    backbones = prep.training_backbones()
    cache = cache if cache is not None else prep.cache
    if cache is not None and task.caches > 1:
        raise UniptError(
            f"task {task.name} trains on {task.caches} caches found by key; --cache does not apply to it"
        )
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
    return readers


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


def _trained(
    prep: Prepared, readers: list[ActivationCache], result: TrainResult, device: torch.device, reason: str
) -> Trained:
    """What the record and the summary need of a task's result and the caches it read."""
    task = prep.task
    backbones: list[PreparedBackbone] = prep.training_backbones()
    prefix = f"{backbones[0].name} " if task.caches > 1 else ""
    return Trained(
        task=task.name,
        metrics=dict(result.metrics),
        history=result.history,
        layer_weights=result.layer_weights,
        layer_names=weighted_layer_names(readers[0].layers, result.layer_weights, prefix),
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
        reader.meta,
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
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)
