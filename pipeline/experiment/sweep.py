"""Train many settings from one cache on Ray Tune: every finished trial is a registered run.

Only ``train.*`` settings vary, so every trial reads the cache extracted (once) for the base config,
or the one cache given (``cache=``: a path, URL or .h5 file; then nothing is extracted and neither the
dataset nor the backbone need be on this machine).

The trials are a grid (a list of :class:`Trial`, each a full config) and, optionally, sampled settings
(:class:`Search`: ``uniform``/``loguniform``/``randint``/``choice`` distributions drawn ``samples``
times per grid point, at random or by Optuna's TPE). Each trial is a Tune trial asking for its share of
the cluster: ``cpus // parallel`` CPUs and, when the cluster has GPUs, a GPU fraction (``gpus_per_trial``,
by default ``1 / ceil(parallel / gpus)``), so trials on a GPU machine really train on the GPU. Each epoch's
validation score is reported to Tune through the fit loop's epoch hook, which lets ASHA stop bad trials
early (``early_stop="asha"``). A failed trial is recorded as failed and the others go on; an interrupted
sweep continues with :func:`resume_sweep`: the trials the registry holds as runs are kept and not run
again, the rest run in a new Tune experiment. Resuming reads no Tune state (its ``tuner.pkl`` is a pickle,
and the sweep's folder under the runs root is not trusted): the sweep's spec comes from the registry,
which recorded it and its sha256 when the sweep started, and ``sweep.json`` must still match that digest.
Results are sorted by the task's headline metric on validation (:mod:`unipt.pipeline.tasks`).

The parts: the trials and sampled settings (:mod:`~unipt.pipeline.experiment.trials`), each trial's share of
the cluster (:mod:`~unipt.pipeline.experiment.sweep_resources`), the Tune experiment
(:mod:`~unipt.pipeline.experiment.sweep_tune`) and one trial in its Ray worker
(:mod:`~unipt.pipeline.experiment.sweep_trial`).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unipt.pipeline import experiment
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.config import ExperimentConfig, validate_stored
from unipt.pipeline.errors import UniptError
from unipt.pipeline.experiment.sweep_resources import cluster_resources, trial_resources
from unipt.pipeline.experiment.sweep_trial import TrialContext
from unipt.pipeline.experiment.sweep_tune import trial_results, tune_trials
from unipt.pipeline.experiment.trials import Distribution, Search, Trial, TrialResult
from unipt.pipeline.hashing import sha256_json
from unipt.pipeline.log import say
from unipt.pipeline.runs.registry import Registry, RunEntry

SWEEP_FILE = "sweep.json"  # what --resume needs to rebuild the sweep, beside Tune's experiment state


@dataclass
class SweepResult:
    sweep_id: str
    headline: str  # the task's headline metric (without the val_/test_ prefix)
    results: list[TrialResult]  # finished by best validation score, then stopped, then failed
    cache_hit: bool
    seconds: float
    resources: dict[str, float] = field(default_factory=dict)  # each trial's request: CPU, GPU


def sweep_dir(runs_root: str | Path, sweep_id: str) -> Path:
    return Path(runs_root).expanduser().resolve() / "sweeps" / sweep_id


def sweep(
    base: ExperimentConfig,
    trials: list[Trial],
    *,
    search: Search | None = None,
    parallel: int | None = None,
    gpus_per_trial: float | None = None,
    early_stop: Literal["asha", "none"] = "none",
    ray_address: str | None = None,
    progress: bool = True,
    cache: str | None = None,
) -> SweepResult:
    """Extract (or reuse) the base config's cache (or use ``cache``), then train every trial on Ray Tune,
    ``parallel`` at a time, each with its CPU and GPU share."""
    search = search or Search()
    if not trials and search.distributions:
        trials = [Trial({}, base)]
    if not trials:
        raise UniptError("a sweep needs at least one trial; give --grid train.KEY=V1,V2 or --sample")
    if parallel is not None and parallel < 1:
        raise UniptError(f"--parallel {parallel}: give 1 or more trials at a time")
    if gpus_per_trial is not None and gpus_per_trial < 0:
        raise UniptError(f"--gpus-per-trial {gpus_per_trial}: give 0 or more (0.5: two trials share a GPU)")
    if search.samples < 1:
        raise UniptError(f"--samples {search.samples}: give 1 or more")
    if early_stop not in ("asha", "none"):
        raise UniptError(f"--early-stop {early_stop}: choose asha or none")
    sweep_id = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    spec = {
        "sweep_id": sweep_id,
        "base": base.model_dump(mode="json"),
        "trials": [{"params": t.params, "config": t.config.model_dump(mode="json")} for t in trials],
        "distributions": {k: [d.kind, list(d.args)] for k, d in search.distributions.items()},
        "samples": search.samples,
        "algorithm": search.algorithm,
        "parallel": parallel,
        "gpus_per_trial": gpus_per_trial,
        "early_stop": early_stop,
        "cache": cache,
    }
    return _run(spec, ray_address=ray_address, progress=progress, resume=False)


def resume_sweep(
    sweep_id: str,
    runs_root: str | Path,
    *,
    registry: str | Path,
    ray_address: str | None = None,
    progress: bool = True,
) -> SweepResult:
    """Continue an interrupted sweep: its registered trials are kept, the others run."""
    path = sweep_dir(runs_root, sweep_id) / SWEEP_FILE
    if not path.exists():
        raise UniptError(
            f"no sweep {sweep_id} under {Path(runs_root).expanduser()}/sweeps; give the id `unipt sweep` "
            "printed, and the same --runs-root (or config) as the sweep"
        )
    return _run(
        trusted_spec(sweep_id, path, registry), ray_address=ray_address, progress=progress, resume=True
    )


def trusted_spec(sweep_id: str, path: Path, registry: str | Path) -> dict[str, Any]:
    """The spec the registry recorded when ``sweep_id`` started, once ``path`` (its sweep.json) is checked
    to still hash to the digest recorded with it: the sweep's folder decides nothing on its own."""
    recorded = None
    if Path(registry).expanduser().is_file():
        with Registry(registry, create=False) as runs:
            recorded = runs.sweep_spec(sweep_id)
    if recorded is None:
        raise UniptError(
            f"the registry {registry} holds no record of sweep {sweep_id}, so its state cannot be trusted; "
            "pass the --registry the sweep used (or start the sweep again)"
        )
    spec, digest = recorded
    try:
        on_disk = sha256_json(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        on_disk = f"unreadable ({type(exc).__name__})"
    if on_disk != digest or sha256_json(spec) != digest:
        raise UniptError(
            f"{path} was changed after sweep {sweep_id} started (sha256 {on_disk[:12]}, the registry "
            f"recorded {digest[:12]}); restore it or start a new sweep"
        )
    return spec


def _run(spec: dict[str, Any], *, ray_address: str | None, progress: bool, resume: bool) -> SweepResult:
    started = time.perf_counter()
    base, trials, search = _parsed(spec)
    cache, sweep_id = spec["cache"], spec["sweep_id"]
    prep = experiment.prepare(base) if cache is None else experiment.prepare_for_cache(cache, base)
    headline = prep.task.headline
    where = sweep_dir(base.storage.runs_root, sweep_id)

    import ray
    import torch  # noqa: F401  (before Ray starts: see extract/runner.py)

    from unipt.extract.ray_session import connect

    owns_session = connect(ray_address)  # one Ray session for the extraction and the trials
    extractions: dict[str, Any] = {}
    # A given cache is read by every trial: hold a read lease on it (gc leaves it alone) until they end.
    held = open_cache(prep.cache, options=base.storage.options) if prep.cache else None
    try:
        if held is None:
            extractions = experiment.extract_all(prep, ray_address=ray_address, progress=progress)
        cache_hit = all(r.cache_hit for r in extractions.values())
        extract_s = sum(r.seconds for r in extractions.values())
        total = len(trials) * search.samples
        registered = _registered(base.storage.registry, sweep_id) if resume else []
        todo = _todo(trials, search, registered)
        resources, parallel = trial_resources(
            cluster_resources(), spec["parallel"], spec["gpus_per_trial"], max(1, len(todo))
        )
        if not resume:
            where.mkdir(parents=True, exist_ok=True)
            (where / SWEEP_FILE).write_text(json.dumps(spec, indent=2) + "\n")
            with Registry(base.storage.registry) as runs:
                runs.record_sweep(sweep_id, spec)
        _say_start(sweep_id, prep.key, resources, parallel, total, len(registered), len(todo), resume)
        context = TrialContext(
            prep,
            trials,
            sweep_id,
            cache_hit,
            extract_s,
            int(resources["cpu"]),
            os.getcwd(),
            time.time(),
            experiment.built_keys(prep, extractions),
        )
        grid = None
        if todo:
            grid = tune_trials(
                spec, search, trials, context, resources, parallel, headline, where, todo, resume
            )
    finally:
        if held is not None:
            experiment.release_reader(held)
        for extraction in extractions.values():  # the caches were leased until every trial had read them
            extraction.release()
        if owns_session:
            ray.shutdown()
    tuned = trial_results(grid, trials, headline) if grid is not None else []
    results = [*_kept(registered, trials), *tuned]
    return _finished(spec, headline, results, resources, total, cache_hit, started)


def _parsed(spec: dict[str, Any]) -> tuple[ExperimentConfig, list[Trial], Search]:
    """The base config, the trials and the sampled settings a sweep's spec holds."""
    base = validate_stored(spec["base"], f"sweep {spec['sweep_id']}")  # perhaps an older unipt's state
    trials = [Trial(t["params"], validate_stored(t["config"], "a sweep trial")) for t in spec["trials"]]
    search = Search(
        {k: Distribution(kind, tuple(args)) for k, (kind, args) in spec["distributions"].items()},
        spec["samples"],
        spec["algorithm"],
    )
    return base, trials, search


def _say_start(
    sweep_id: str,
    key: str,
    resources: dict[str, float],
    parallel: int,
    total: int,
    kept: int,
    todo: int,
    resume: bool,
) -> None:
    """One line: the trials, the cache they read, how many run at once and with what share each."""
    gpu = f", {resources['gpu']:g} GPU each" if resources["gpu"] else ""
    resumed = f" (resumed: {kept} registered trial(s) kept, {todo} to run)" if resume else ""
    say(
        f"{sweep_id}: {total} trials on cache {key}, {parallel} at a time, "
        f"{int(resources['cpu'])} CPU(s) each{gpu}{resumed}"
    )


def _finished(
    spec: dict[str, Any],
    headline: str,
    results: list[TrialResult],
    resources: dict[str, float],
    total: int,
    cache_hit: bool,
    started: float,
) -> SweepResult:
    """The sweep's result, its trials in order (finished by best validation score, then stopped, then
    failed); an interrupted sweep (trials left unfinished) raises, saying how to continue it."""
    sweep_id = spec["sweep_id"]
    for index, result in enumerate(results):
        result.index = index
    request = {"CPU": resources["cpu"], "GPU": resources["gpu"]}
    for result in results:
        result.resources = result.resources or request
    # Tune ends fit() quietly on Ctrl-C: trials still running, or never started, mean an interruption.
    done = sum(r.status != "interrupted" for r in results)
    if done < total:
        raise UniptError(
            f"sweep {sweep_id} was interrupted with {total - done} of {total} trials unfinished; "
            f"continue it with `unipt sweep --resume {sweep_id}` (finished trials are kept)"
        )
    order = {"finished": 0, "stopped": 1, "failed": 2}
    results.sort(key=lambda r: (order.get(r.status, 3), _val_order(r.metrics, headline), r.index))
    return SweepResult(sweep_id, headline, results, cache_hit, time.perf_counter() - started, request)


def _registered(registry: str | Path, sweep_id: str) -> list[RunEntry]:
    """The sweep's trials the registry holds as runs: finished, so a resumed sweep does not run them."""
    if not Path(registry).expanduser().is_file():
        return []
    with Registry(registry, create=False) as runs:
        return runs.list(sweep_id=sweep_id)


def _grid_point(trials: list[Trial], params: dict[str, Any] | None) -> int | None:
    """Which trial (grid point) a registered run's swept params came from."""
    params = params or {}
    return next(
        (i for i, t in enumerate(trials) if all(params.get(k) == v for k, v in t.params.items())), None
    )


def _todo(trials: list[Trial], search: Search, registered: list[RunEntry]) -> list[int]:
    """The grid points still to run, one entry per trial: ``samples`` per point, less the registered ones
    (Optuna picks the point itself: then only how many are left counts)."""
    done = [0] * len(trials)
    for entry in registered:
        point = _grid_point(trials, entry.sweep_params)
        if point is not None:
            done[point] += 1
    if search.algorithm == "optuna":
        return list(range(max(0, len(trials) * search.samples - len(registered))))
    return [i for i in range(len(trials)) for _ in range(max(0, search.samples - done[i]))]


def _kept(registered: list[RunEntry], trials: list[Trial]) -> list[TrialResult]:
    """A resumed sweep's registered trials, as results (their runs' metrics and resources)."""
    return [
        TrialResult(
            0,
            dict(entry.sweep_params or {}),
            entry.run_id,
            entry.metrics,
            "finished",
            int(entry.metrics.get("epochs", 0) or 0),
            resources={k: float(v) for k, v in (entry.runtime.get("ray_resources") or {}).items()},
        )
        for entry in registered
    ]


def _val_order(metrics: dict[str, Any], headline: str) -> tuple[int, float]:
    value = metrics.get(f"val_{headline}")
    if not isinstance(value, (int, float)) or math.isnan(value):
        return (1, 0.0)  # trials without a validation score go last
    return (0, -value)
