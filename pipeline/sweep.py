"""Train many settings from one cache: every trial is a Ray task and a registered run.

Only ``train.*`` settings vary, so every trial reads the cache extracted (once) for the base config,
or the one cache given (``cache=``: a path, URL or .h5 file; then nothing is extracted and neither the
dataset nor the backbone need be on this machine).
Results are sorted by the task's headline metric on validation (:mod:`pipeline.tasks`).
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pipeline import experiment
from pipeline.cache_open import open_cache
from pipeline.config import ExperimentConfig
from pipeline.errors import UniptError
from pipeline.log import say


@dataclass
class Trial:
    params: dict[str, Any]  # the swept settings, e.g. {"train.lr": 0.001}
    config: ExperimentConfig


@dataclass
class TrialResult:
    index: int  # position in the sweep's trial list
    params: dict[str, Any]
    run_id: str
    metrics: dict[str, Any]


@dataclass
class SweepResult:
    sweep_id: str
    headline: str  # the task's headline metric (without the val_/test_ prefix)
    results: list[TrialResult]  # best validation score first; trials without one last
    cache_hit: bool
    seconds: float


def describe(params: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in params.items())


def train_trial(prep: experiment.Prepared, threads: int) -> tuple[experiment.Trained, float]:
    """One trial, run as a Ray task: train from the cache with this task's CPU share."""
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    trained = experiment.train(prep, progress=False)
    return trained, round(time.perf_counter() - started, 3)


def sweep(
    base: ExperimentConfig,
    trials: list[Trial],
    *,
    parallel: int | None = None,
    ray_address: str | None = None,
    progress: bool = True,
    cache: str | None = None,
) -> SweepResult:
    """Extract (or reuse) the base config's cache (or use ``cache``), then train every trial, ``parallel``
    at a time."""
    if not trials:
        raise UniptError("a sweep needs at least one trial; give --grid train.KEY=V1,V2")
    if parallel is not None and parallel < 1:
        raise UniptError(f"--parallel {parallel}: give 1 or more trials at a time")
    started = time.perf_counter()
    prep = experiment.prepare(base) if cache is None else experiment.prepare_for_cache(cache, base)
    headline = prep.task.headline

    import ray
    import torch  # noqa: F401  (before Ray starts: see extract/runner.py)

    from extract.ray_session import connect, root_cause

    owns_session = connect(ray_address)  # one Ray session for the extraction and the trials
    sweep_id = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    results: list[TrialResult] = []
    extractions: dict[str, Any] = {}
    # A given cache is read by every trial: hold a read lease on it (gc leaves it alone) until they end.
    held = open_cache(prep.cache, options=base.storage.options) if prep.cache else None
    try:
        if held is None:
            extractions = experiment.extract_all(prep, ray_address=ray_address, progress=progress)
        cache_hit = all(r.cache_hit for r in extractions.values())
        extract_s = sum(r.seconds for r in extractions.values())
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        parallel = min(parallel or cpus, len(trials))
        share = max(1, cpus // parallel)
        say(
            f"{sweep_id}: {len(trials)} trials on cache {prep.key}, {parallel} at a time, {share} CPU(s) each"
        )
        task = ray.remote(train_trial).options(num_cpus=share)
        pending: dict[Any, int] = {}
        queue = list(range(len(trials)))
        while queue or pending:
            while queue and len(pending) < parallel:
                i = queue.pop(0)
                pending[task.remote(dataclasses.replace(prep, config=trials[i].config), share)] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                trained, train_s = ray.get(done[0])
            except ray.exceptions.RayError as exc:
                raise UniptError(
                    f"sweep trial {describe(trials[i].params)} failed in a Ray worker: {root_cause(exc)}; "
                    f"finished trials are registered under sweep {sweep_id}"
                ) from exc
            timings = experiment.Timings(
                round(extract_s, 3), train_s, round(time.perf_counter() - started, 3)
            )
            lineage = {
                "sweep": {"id": sweep_id, "trial": i, "trials": len(trials), "params": trials[i].params}
            }
            trial_prep = dataclasses.replace(prep, config=trials[i].config)
            run_dir = experiment.record(trial_prep, trained, True, timings, lineage)
            m = trained.metrics
            say(
                f"trial {len(results) + 1}/{len(trials)} {describe(trials[i].params)}: "
                f"val_{headline} {m.get(f'val_{headline}', math.nan):.4f} "
                f"test_{headline} {m.get(f'test_{headline}', math.nan):.4f} -> {run_dir.name}"
            )
            results.append(TrialResult(i, trials[i].params, run_dir.name, m))
    finally:
        if held is not None:
            experiment.release_reader(held)
        for extraction in extractions.values():  # the caches were leased until every trial had read them
            extraction.release()
        if owns_session:
            ray.shutdown()
    results.sort(key=lambda r: (_val_order(r.metrics, headline), r.index))
    return SweepResult(sweep_id, headline, results, cache_hit, time.perf_counter() - started)


def _val_order(metrics: dict[str, Any], headline: str) -> tuple[int, float]:
    value = metrics.get(f"val_{headline}")
    if not isinstance(value, (int, float)) or math.isnan(value):
        return (1, 0.0)  # trials without a validation score go last
    return (0, -value)
