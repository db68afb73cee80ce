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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unipt.pipeline import experiment
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.config import ExperimentConfig, TrainConfig, validate_stored
from unipt.pipeline.cuda_support import no_cuda_cause
from unipt.pipeline.errors import UniptError
from unipt.pipeline.hashing import sha256_json
from unipt.pipeline.log import say
from unipt.pipeline.runs.registry import Registry, RunEntry

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
SWEEP_FILE = "sweep.json"  # what --resume needs to rebuild the sweep, beside Tune's experiment state


@dataclass
class Trial:
    params: dict[str, Any]  # the swept settings, e.g. {"train.lr": 0.001}
    config: ExperimentConfig


@dataclass(frozen=True)
class Distribution:
    """One sampled ``train.*`` setting: ``uniform``/``loguniform`` (low, high), ``randint`` (low, high,
    high exclusive) or ``choice`` (the values)."""

    kind: str
    args: tuple[Any, ...]

    def tune(self) -> Any:
        from ray import tune

        return {
            "uniform": tune.uniform,
            "loguniform": tune.loguniform,
            "randint": tune.randint,
            "choice": lambda *values: tune.choice(list(values)),
        }[self.kind](*self.args)


@dataclass
class Search:
    """Sampled settings on top of the grid: ``samples`` draws per grid point, ``random`` or ``optuna``."""

    distributions: dict[str, Distribution] = field(default_factory=dict)
    samples: int = 1
    algorithm: Literal["random", "optuna"] = "random"


@dataclass
class TrialResult:
    index: int  # position in the sweep's trial list (Tune's trial order)
    params: dict[str, Any]
    run_id: str | None  # the registered run; None for a stopped or failed trial
    metrics: dict[str, Any]  # a finished trial's run metrics; else its last reported epoch's
    status: str = "finished"  # finished, stopped (ASHA), failed
    epochs: int = 0  # epochs reported
    resources: dict[str, float] = field(default_factory=dict)  # what the trial asked Ray for
    error: str | None = None  # a failed trial's cause, one line


@dataclass
class SweepResult:
    sweep_id: str
    headline: str  # the task's headline metric (without the val_/test_ prefix)
    results: list[TrialResult]  # finished by best validation score, then stopped, then failed
    cache_hit: bool
    seconds: float
    resources: dict[str, float] = field(default_factory=dict)  # each trial's request: CPU, GPU


def describe(params: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in params.items())


def sweep_dir(runs_root: str | Path, sweep_id: str) -> Path:
    return Path(runs_root).expanduser().resolve() / "sweeps" / sweep_id


# ---------------------------------------------------------------------------------------------- trial


@dataclass
class _Context:
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


def trial_config(trial: Trial, sampled: dict[str, Any]) -> ExperimentConfig:
    """The trial's config with the sampled ``train.*`` values, validated like any config."""
    if not sampled:
        return trial.config
    train = {**trial.config.train.model_dump(), **{k.partition(".")[2]: v for k, v in sampled.items()}}
    return trial.config.model_copy(update={"train": TrainConfig.model_validate(train)})


def _run_trial(space: dict[str, Any], context: _Context) -> None:
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
            tune.report({"epoch": epoch, headline: _number(record.get(headline))})

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
            headline: _number(last.get(headline)),
            "run_id": run_dir.name,
            "metrics": json.loads(json.dumps(trained.metrics, default=str)),
            "device": trained.runtime.get("device_reason", trained.runtime.get("device")),
        }
    )


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


# ---------------------------------------------------------------------------------------------- sweep


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
    base = validate_stored(spec["base"], f"sweep {spec['sweep_id']}")  # perhaps an older unipt's state
    trials = [Trial(t["params"], validate_stored(t["config"], "a sweep trial")) for t in spec["trials"]]
    search = Search(
        {k: Distribution(kind, tuple(args)) for k, (kind, args) in spec["distributions"].items()},
        spec["samples"],
        spec["algorithm"],
    )
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
            _cluster(), spec["parallel"], spec["gpus_per_trial"], max(1, len(todo))
        )
        if not resume:
            where.mkdir(parents=True, exist_ok=True)
            (where / SWEEP_FILE).write_text(json.dumps(spec, indent=2) + "\n")
            with Registry(base.storage.registry) as runs:
                runs.record_sweep(sweep_id, spec)
        gpu = f", {resources['gpu']:g} GPU each" if resources["gpu"] else ""
        kept = f" (resumed: {len(registered)} registered trial(s) kept, {len(todo)} to run)" if resume else ""
        say(
            f"{sweep_id}: {total} trials on cache {prep.key}, {parallel} at a time, "
            f"{int(resources['cpu'])} CPU(s) each{gpu}{kept}"
        )
        context = _Context(
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
            grid = _tune(spec, search, trials, context, resources, parallel, headline, where, todo, resume)
    finally:
        if held is not None:
            experiment.release_reader(held)
        for extraction in extractions.values():  # the caches were leased until every trial had read them
            extraction.release()
        if owns_session:
            ray.shutdown()
    results = [*_kept(registered, trials), *(_results(grid, trials, headline) if grid is not None else [])]
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


RAY_RESOURCE_STEP = 1e-4  # Ray's resolution for fractional resources
TRIALS_PER_GPU = 2  # the default parallelism on a GPU machine, per GPU: overlaps one trial's data wait


def gpu_share(parallel: int, gpus: float) -> float:
    """Each trial's GPU share when ``parallel`` trials split ``gpus``: ``1 / ceil(parallel / gpus)``,
    floored to Ray's resolution (a rounded-up share would fit one trial fewer on a GPU: 1/6 -> 0.1667
    fits 5) and at most one GPU (a trial uses one; a share of 2 would hold a GPU it never touches)."""
    if gpus <= 0:
        return 0.0
    per_gpu = math.ceil(parallel / gpus)
    return min(1.0, math.floor(round(1 / per_gpu / RAY_RESOURCE_STEP, 6)) * RAY_RESOURCE_STEP)


def default_parallel(cpus: int, gpus: float) -> int:
    """Trials at a time when ``--parallel`` is not given: a small multiple of the GPUs on a GPU cluster
    (one per CPU would put 16 processes on one GPU), else one per CPU."""
    return max(1, int(TRIALS_PER_GPU * gpus)) if gpus > 0 else cpus


def _cluster() -> dict[str, float]:
    """The connected Ray cluster's resources (``CPU``, ``GPU``, ...)."""
    import ray

    return ray.cluster_resources()


def trial_resources(
    cluster: dict[str, float], parallel: int | None, gpus_per_trial: float | None, total: int
) -> tuple[dict, int]:
    """Each trial's request ({"cpu", "gpu"}) and how many run at once, on a Ray ``cluster`` of those
    resources (``ray.cluster_resources()``).

    An even split of the cluster: ``cpus // parallel`` CPUs and, when it has GPUs, :func:`gpu_share`
    of a GPU. A trial with no GPU share trains on the CPU (see :func:`_run_trial`).
    """
    cpus, gpus = max(1, int(cluster.get("CPU", 1))), float(cluster.get("GPU", 0))
    parallel = min(parallel or default_parallel(cpus, gpus), total)
    share = max(1, cpus // parallel)
    if gpus_per_trial is None:
        gpu = gpu_share(parallel, gpus)
    else:
        gpu = float(gpus_per_trial)
        if gpu > gpus:
            raise UniptError(
                f"--gpus-per-trial {gpu:g} but the Ray cluster has {gpus:g} GPU(s); give at most that, "
                "or 0 to train on CPUs"
            )
    return {"cpu": share, "gpu": gpu}, parallel


def _tune(
    spec: dict[str, Any],
    search: Search,
    trials: list[Trial],
    context: _Context,
    resources: dict[str, float],
    parallel: int,
    headline: str,
    where: Path,
    todo: list[int],
    resume: bool,
) -> Any:
    """Run the trials ``todo`` names (grid points, repeated once per draw) as one Tune experiment: the
    sweep's own, or a resumed sweep's next one beside it (``resume-<time>``); Tune's state is never read."""
    try:
        from ray import tune
    except ImportError as exc:  # ray without its tune extra (pandas, tensorboardX, ...)
        raise UniptError(
            f"unipt sweep runs on Ray Tune, which is not installed ({exc}); install it with "
            "pip install 'unipt-cache[tune]'"
        ) from exc

    metric = f"val_{headline}"
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, context=context), {"cpu": resources["cpu"], "gpu": resources["gpu"]}
    )
    space: dict[str, Any] = {k: d.tune() for k, d in search.distributions.items()}
    searcher = None
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # Optuna proposes every value, so the grid's points become one categorical choice.
        space["trial"] = tune.choice(list(range(len(trials))))
        searcher = OptunaSearch(metric=metric, mode="max", seed=context.prep.config.seed)
    else:
        space["trial"] = tune.grid_search(todo)  # a point listed twice is drawn twice
    scheduler = None
    if spec["early_stop"] == "asha":
        from ray.tune.schedulers import ASHAScheduler

        epochs = max(t.config.train.epochs for t in trials)
        scheduler = ASHAScheduler(
            time_attr="training_iteration", max_t=epochs, grace_period=1, reduction_factor=2
        )
    name, storage = (
        (f"resume-{time.strftime('%Y%m%d-%H%M%S')}", where) if resume else (where.name, where.parent)
    )
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="max",
            num_samples=len(todo) if searcher is not None else 1,
            search_alg=searcher,
            scheduler=scheduler,
            max_concurrent_trials=parallel,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            verbose=0,
            # One failed trial is recorded as failed; the others go on.
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            callbacks=[_SayTrials(metric, trials, len(todo))],
        ),
    )
    # Tune's own console output (its config box, each failure's whole traceback) is off: the sweep says
    # one line per trial and prints its table.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.CRITICAL)
    try:
        return tuner.fit()
    finally:
        tune_logger.setLevel(level)


class _SayTrials:
    """A Tune callback (built lazily: ray.tune is imported only by a sweep) that says each trial's end and,
    at every epoch a trial reports and every end, one progress line: trials done, running and pending,
    and the best validation score so far (a plain line per event, so a log file reads it too)."""

    def __new__(cls, metric: str, grid: list[Trial], total: int) -> Any:
        from ray.tune import Callback

        class SayTrials(Callback):
            def __init__(self) -> None:
                super().__init__()
                self.ended: set[str] = set()
                self.best: tuple[float, str] | None = None  # (score, what scored it)

            def _score(self, value: Any, trial: Any, epoch: Any) -> None:
                value = _number(value)
                if not math.isnan(value) and (self.best is None or value > self.best[0]):
                    self.best = (
                        value,
                        f"trial {trial.trial_id} {_params(grid, trial.config)}, epoch {epoch}",
                    )

            def _progress(self, trials: list) -> None:
                running = sum(t.status == "RUNNING" and t.trial_id not in self.ended for t in trials)
                done = len(self.ended)
                best = f"{metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else "none yet"
                say(f"sweep: {done} of {total} trials done, {running} running, "
                    f"{max(0, total - done - running)} pending; best so far {best}")  # fmt: skip

            def on_trial_result(
                self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
            ) -> None:
                if result.get("run_id"):
                    return  # the final report: on_trial_complete says it
                self._score(result.get(metric), trial, result.get("epoch"))
                self._progress(trials)

            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                last = trial.last_result or {}
                params = _params(grid, trial.config)
                self.ended.add(trial.trial_id)
                if last.get("run_id"):
                    # The run's metrics are its selected (best) epoch's, as the table shows; the last
                    # report's own value is the last epoch's.
                    chosen = last.get("metrics") or {}
                    epoch = f" (epoch {chosen['best_epoch']})" if "best_epoch" in chosen else ""
                    self._score(chosen.get(metric), trial, chosen.get("best_epoch", last.get("epoch")))
                    say(f"trial {trial.trial_id} {params}: {metric} {_number(chosen.get(metric)):.4f}{epoch} "
                        f"-> {last['run_id']}")  # fmt: skip
                else:
                    say(f"trial {trial.trial_id} {params}: stopped after epoch {last.get('epoch', 0)} "
                        f"({metric} {_number(last.get(metric)):.4f})")  # fmt: skip
                self._progress(trials)

            def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                params = _params(grid, trial.config)
                self.ended.add(trial.trial_id)
                say(f"trial {trial.trial_id} {params}: failed (cause below); the others go on")
                self._progress(trials)

        return SayTrials()


def _params(trials: list[Trial], config: dict[str, Any]) -> str:
    return describe(
        {**trials[config.get("trial", 0)].params, **{k: v for k, v in config.items() if k != "trial"}}
    )


def _results(grid: Any, trials: list[Trial], headline: str) -> list[TrialResult]:
    from unipt.extract.ray_session import root_cause

    # The trials' states (terminated, error, or still pending/running when the sweep was interrupted).
    states = {t.trial_id: t.status for t in grid._experiment_analysis.trials}
    out = []
    for index, result in enumerate(grid):
        config = result.config or {}
        i = config.get("trial", 0)
        params = {**trials[i].params, **{k: v for k, v in config.items() if k != "trial"}}
        last = result.metrics or {}
        # A trial that never reported has no trial_id in its metrics; its directory name holds it.
        state = states.get(last.get("trial_id")) or next(
            (s for tid, s in states.items() if tid in str(result.path)), None
        )
        if result.error is not None:
            cause = root_cause(result.error)
            out.append(TrialResult(index, params, None, {}, "failed", last.get("epoch", 0), error=cause))
        elif last.get("run_id"):
            metrics = last.get("metrics", {})
            out.append(TrialResult(index, params, last["run_id"], metrics, "finished", last.get("epoch", 0)))
        elif state == "TERMINATED":
            seen = {f"val_{headline}": last.get(f"val_{headline}")}
            out.append(TrialResult(index, params, None, seen, "stopped", last.get("epoch", 0)))
        else:
            out.append(TrialResult(index, params, None, {}, "interrupted", last.get("epoch", 0)))
    return out


def _val_order(metrics: dict[str, Any], headline: str) -> tuple[int, float]:
    value = metrics.get(f"val_{headline}")
    if not isinstance(value, (int, float)) or math.isnan(value):
        return (1, 0.0)  # trials without a validation score go last
    return (0, -value)
