"""The recipe: unipt's Python API, and the one place (with the CLI) that drives both stages.

Read top to bottom, a job is::

    prep = prepare(config)               # dataset -> fingerprint; backbones -> identities -> cache keys
                                         # (or prepare_for_cache(path): all of it from a cache alone)
    extract_all(prep)                    # stage 1: each backbone's cache, built once (a hit costs nothing)
    trained = train(prep)                # stage 2: the task's model from the cache(s); no backbone
    run_dir = record(prep, trained, ...) # run record, plots, the run registry

:func:`run` is exactly that, with timings, tracking and resume; :func:`train_from_cache` is the same without
stage 1. Each step is a module of its own, beside this one: :mod:`.preparation`, :mod:`.extraction`,
:mod:`.training` and :mod:`.recording`; :mod:`.resuming` says who a run is (a fresh id, or an interrupted
run's, continuing from its checkpoint). Results are dataclasses. Progress goes to the ``unipt`` logger
(:mod:`unipt.pipeline.log`). Stage 1's Ray and backbones are imported only when a cache is built, so
training never loads them.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.provenance import key_fields_of, key_of
from unipt.pipeline.experiment.extraction import built_keys, extract_all, leased
from unipt.pipeline.experiment.preparation import Prepared, check_cache_matches
from unipt.pipeline.experiment.preparation import PreparedBackbone as PreparedBackbone  # plan.py's import
from unipt.pipeline.experiment.recording import RunResult, record, timings_since
from unipt.pipeline.experiment.resuming import RunStart, start_run
from unipt.pipeline.experiment.training import require_caches, torch_threads, train
from unipt.pipeline.log import say
from unipt.pipeline.model.mlflow_export import log_pyfunc_model
from unipt.pipeline.runs.tracking import Tracker

if TYPE_CHECKING:
    from unipt.extract.runner import ExtractionResult


@dataclass
class Stage1:
    """What stage 1 left for training: whether every cache was a hit, how long extracting took, the keys
    of the caches it wrote (new content no run has read yet), and an explicit cache to read, if any."""

    cache_hit: bool
    extract_s: float = 0.0
    built: frozenset[str] = frozenset()
    reader: ActivationCache | None = None


def run(
    prep: Prepared, *, ray_address: str | None = None, progress: bool = True, resume: str | None = None
) -> RunResult:
    """The whole job: extract every backbone's cache (or reuse it), train, record."""
    started = time.perf_counter()
    start = start_run(prep, resume)  # the registry made ready; a fresh run id, or the interrupted run's
    if start.finished is not None:
        return start.finished
    extractions = extract_all(prep, ray_address=ray_address, progress=progress)
    # Each result holds a read lease taken before its build lock was let go: `unipt cache gc` cannot
    # remove a cache between its extraction and the end of training.
    with leased(extractions):
        return train_and_record(prep, start, extracted(prep, extractions), started, progress=progress)


def train_from_cache(
    prep: Prepared, cache: str | None = None, *, progress: bool = True, resume: str | None = None
) -> RunResult:
    """Train and record from caches that exist (by key, or ``cache``); never runs a backbone."""
    started = time.perf_counter()
    start = start_run(prep, resume)
    if start.finished is not None:
        return start.finished
    with ExitStack() as opened:
        prep, reader = existing_cache(prep, cache if cache is not None else prep.cache, opened)
        return train_and_record(prep, start, Stage1(True, reader=reader), started, progress=progress)


def train_and_record(
    prep: Prepared, start: RunStart, stage1: Stage1, started: float, *, progress: bool
) -> RunResult:
    """Stage 2 and the record, with the run's tracking sinks open: train from what stage 1 left (resuming
    from ``start``'s checkpoint), record the run; ``started``: when the job began."""
    train_started = time.perf_counter()
    tracker = start_tracking(prep, start.run_id)
    try:
        with torch_threads(start.torch_threads):
            trained = train(
                prep,
                stage1.reader,
                progress=progress,
                checkpoint=start.checkpoint_file(prep),
                resume=start.resume,
                meta={"run_id": start.run_id, "torch_threads": torch.get_num_threads()},
                on_epoch_end=tracker.epoch if tracker.enabled else None,
                built=stage1.built,
                on_step=tracker.step_hook(),
            )
        timings = timings_since(started, train_started, stage1.extract_s)
        extra = {"tracking": tracker.ids()} if tracker.enabled else None
        run_dir = record(prep, trained, stage1.cache_hit, timings, extra=extra, run_id=start.run_id)
    except BaseException:
        tracker.fail()
        raise
    tracker.finish(run_dir, trained.history, trained.metrics)
    return RunResult(run_dir, trained, timings, stage1.cache_hit)


def extracted(prep: Prepared, extractions: dict[str, ExtractionResult]) -> Stage1:
    """What these extractions leave for training (every backbone's cache, found by key)."""
    return Stage1(
        cache_hit=all(result.cache_hit for result in extractions.values()),
        extract_s=sum(result.seconds for result in extractions.values()),
        built=built_keys(prep, extractions),
    )


def existing_cache(
    prep: Prepared, cache: str | None, opened: ExitStack
) -> tuple[Prepared, ActivationCache | None]:
    """The cache to train from, opened on ``opened``, and ``prep`` holding that cache's key; with no
    ``cache``, none (training finds each cache by key), once they are checked to exist."""
    if cache is None:
        require_caches(prep, "run `unipt extract CONFIG` first (or `unipt run`)")
        return prep, None
    options, order = prep.config.storage.options, prep.config.train.view_order
    reader = opened.enter_context(open_cache(cache, options=options, view_order=order))
    if prep.cache != str(cache):
        # The run records the key of the cache it reads, never the config's: rerun and gc rely on it.
        check_cache_matches(prep, reader)
        primary = dataclasses.replace(prep.primary, key=key_of(reader), key_fields=key_fields_of(reader))
        prep = dataclasses.replace(prep, backbones={primary.name: primary}, cache=str(cache))
    say(f"training from {reader.source} (no backbone forward pass)")
    return prep, reader


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
