"""A sweep's trials as one Ray Tune experiment: the search space, searcher and scheduler, a line per trial as
it ends, and each trial's result read back from Tune's grid."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from unipt.pipeline.errors import UniptError
from unipt.pipeline.experiment.sweep_trial import TrialContext, as_number, run_trial
from unipt.pipeline.experiment.trials import Search, Trial, TrialResult, describe
from unipt.pipeline.log import say


def tune_trials(
    spec: dict[str, Any],
    search: Search,
    trials: list[Trial],
    context: TrialContext,
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
        tune.with_parameters(run_trial, context=context), {"cpu": resources["cpu"], "gpu": resources["gpu"]}
    )
    space, searcher = _space_and_searcher(search, trials, todo, metric, context.prep.config.seed)
    scheduler = _asha(trials) if spec["early_stop"] == "asha" else None
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
    return _fit_quietly(tuner)


def _space_and_searcher(
    search: Search, trials: list[Trial], todo: list[int], metric: str, seed: int
) -> tuple[dict[str, Any], Any]:
    """Tune's parameter space (the sampled settings and the grid point) and the searcher that draws it:
    None for random draws over the grid, else Optuna's."""
    from ray import tune

    space: dict[str, Any] = {k: d.tune() for k, d in search.distributions.items()}
    searcher = None
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # Optuna proposes every value, so the grid's points become one categorical choice.
        space["trial"] = tune.choice(list(range(len(trials))))
        searcher = OptunaSearch(metric=metric, mode="max", seed=seed)
    else:
        space["trial"] = tune.grid_search(todo)  # a point listed twice is drawn twice
    return space, searcher


def _asha(trials: list[Trial]) -> Any:
    """ASHA over the trials' epochs (``early_stop="asha"``): a trial may stop after any epoch."""
    from ray.tune.schedulers import ASHAScheduler

    epochs = max(t.config.train.epochs for t in trials)
    return ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=1, reduction_factor=2)


def _fit_quietly(tuner: Any) -> Any:
    """``tuner.fit()`` with Tune's own console output (its config box, each failure's whole traceback)
    off: the sweep says one line per trial and prints its table."""
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
                value = as_number(value)
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
                    score = as_number(chosen.get(metric))
                    say(f"trial {trial.trial_id} {params}: {metric} {score:.4f}{epoch} -> {last['run_id']}")
                else:
                    say(f"trial {trial.trial_id} {params}: stopped after epoch {last.get('epoch', 0)} "
                        f"({metric} {as_number(last.get(metric)):.4f})")  # fmt: skip
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


def trial_results(grid: Any, trials: list[Trial], headline: str) -> list[TrialResult]:
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
