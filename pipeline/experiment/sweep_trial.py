"""One sweep trial as Ray Tune runs it, in a Ray worker: train from the cache, report each epoch, record the
run. Tune pickles :func:`run_trial` and its :class:`TrialContext` by module path: both live here, importable
in every worker."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from unipt.pipeline import experiment
from unipt.pipeline.cuda_support import no_cuda_cause
from unipt.pipeline.experiment.trials import Trial, trial_config


@dataclass
class TrialContext:
    """Everything a trial needs, shipped once to Ray's object store."""

    prep: experiment.Prepared
    trials: list[Trial]
    sweep_id: str
    cache_hit: bool
    extract_s: float
    threads: int
    cwd: str  # the driver's: Tune starts trials in their own directory, and configs hold relative paths
    started: float
    built: frozenset[str] = frozenset()  # keys this sweep extracted: no registered run read them yet


def run_trial(space: dict[str, Any], context: TrialContext) -> None:
    """One Tune trial, in a Ray worker: train from the cache, reporting each epoch; record the run."""
    import ray
    import torch
    from ray import tune

    os.chdir(context.cwd)
    torch.set_num_threads(context.threads)
    trial = context.trials[space["trial"]]
    sampled = {k: v for k, v in space.items() if k != "trial"}
    resources = {k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()}
    config = trial_config(trial, sampled)
    if not resources.get("GPU"):
        # Ray no longer hides the GPUs from a trial that asked for none: "CPU" trials would all land on
        # cuda:0, beside the trials that hold its shares.
        config = config.model_copy(update={"train": config.train.model_copy(update={"device": "cpu"})})
    prep = dataclasses.replace(context.prep, config=config)
    headline = f"val_{prep.task.headline}"
    epochs = prep.config.train.epochs

    def report(epoch: int, record: dict[str, Any]) -> None:
        # The last epoch is reported after the run is recorded: a scheduler stopping the trial then
        # cannot cut it off between its last epoch and its run record.
        if epoch < epochs:
            tune.report({"epoch": epoch, headline: as_number(record.get(headline))})

    started = time.perf_counter()
    trained = experiment.train(prep, progress=False, on_epoch_end=report, built=context.built)
    trained.runtime["ray_resources"] = resources
    if resources.get("GPU") and trained.runtime.get("device") == "cpu":
        # Ray set a GPU aside for this trial but torch cannot see one: say so in the record.
        trained.runtime["device_reason"] = (
            f"cpu (no GPU visible: Ray gave this trial {resources['GPU']:g} GPU, but {no_cuda_cause()})"
        )
    timings = experiment.Timings(
        round(context.extract_s, 3),
        round(time.perf_counter() - started, 3),
        round(time.time() - context.started, 3),
    )
    params = {**trial.params, **sampled}
    lineage = {"sweep": {"id": context.sweep_id, "trial": space["trial"], "params": params}}
    run_dir = experiment.record(prep, trained, context.cache_hit, timings, lineage)
    last = trained.history[-1] if trained.history else {}
    tune.report(
        {
            "epoch": len(trained.history),
            headline: as_number(last.get(headline)),
            "run_id": run_dir.name,
            "metrics": json.loads(json.dumps(trained.metrics, default=str)),
            "device": trained.runtime.get("device_reason", trained.runtime.get("device")),
        }
    )


def as_number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan
