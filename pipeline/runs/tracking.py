"""Tracking sinks: a run's numbers, settings and files sent to MLflow and/or TensorBoard as it trains.

Off unless the config's ``tracking:`` section names a sink (``tensorboard: DIR``, ``mlflow: URI``). The
run record and the registry stay the source of truth; a sink is a view of the run for the tools
researchers already watch, and the registry keeps the ids to find it there (``tracking`` in the record
and the registered run's artifacts).

What each sink gets:

- every ``tracking.log_every_steps`` optimiser steps (x: the step over the whole run): ``train_step_loss``
  (that batch's loss) and ``train_step_lr``, the loss curve (TensorBoard: ``train/step_loss``);
- per epoch (live, as the fit loop reports it; x: the epoch): ``train_loss``, ``lr`` and every ``val_*``
  metric;
- at the end: the final metrics (``test_acc``, ``val_acc``, the baselines' under their own names);
- the config as params (MLflow; flattened ``train.lr``-style keys), or, in TensorBoard, one YAML text and
  the HPARAMS view (the flattened config as hyperparameters, the final metrics as its metrics);
- tags: the unipt run id, the dataset fingerprint and the cache key;
- MLflow only: the run's plots, ``model.safetensors``, ``model.json``, the ``README.md``
  model card and ``record.json`` as artifacts, and, with ``tracking.mlflow_log_model``, the model as an
  MLflow pyfunc model under ``model/`` (:mod:`unipt.pipeline.model.mlflow_export`), which MLflow's registry
  can serve.

TensorBoard writes ``<DIR>/<run_id>/events.out.tfevents.*``, one folder per run, so ``tensorboard
--logdir DIR`` compares runs. Both need ``pip install 'unipt-cache[tracking]'``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from unipt.pipeline.errors import UniptError
from unipt.pipeline.extras import require
from unipt.pipeline.log import say
from unipt.pipeline.runs.compare import flatten

if TYPE_CHECKING:
    from unipt.pipeline.config import ExperimentConfig, TrackingConfig
    from unipt.train.fit import StepHook

# Files of a run directory that go to MLflow as artifacts, when the run wrote them.
ARTIFACT_FILES = (
    "curves.png",
    "layer_weights.png",
    "confusion.png",
    "model.safetensors",
    "model.json",
    "README.md",  # the model card
    "record.json",
    "config.yaml",
)
# MLflow refuses a param value longer than this.
_MAX_PARAM_CHARS = 6000


class Tracker:
    """One run's sinks; every method is a no-op for a sink the config leaves off."""

    def __init__(
        self, config: TrackingConfig, run_id: str, log_model: Callable[[Any, str, Path], None] | None = None
    ) -> None:
        self.config = config
        self.run_id = run_id
        # How the tuned model is logged (tracking.mlflow_log_model): given by the recipe, which knows the
        # model files (unipt.pipeline.model), so run tracking does not import them.
        if config.mlflow_log_model and log_model is None:  # said before training, not after it
            raise UniptError(
                "tracking.mlflow_log_model is true but this tracker was given no way to log the "
                "model; pass log_model=unipt.pipeline.model.mlflow_export.log_pyfunc_model to Tracker"
            )
        self._log_model = log_model
        self.mlflow_run_id: str | None = None
        self._mlflow: Any = None  # an MlflowClient
        self._tensorboard: Any = None  # a SummaryWriter
        self._logged_epochs: set[int] = set()
        self._config: dict[str, Any] = {}  # the experiment's config, flattened to train.lr-style keys
        self._hparams: dict[str, Any] = {}

    @property
    def enabled(self) -> bool:
        return self.config.tensorboard is not None or self.config.mlflow is not None

    def step_hook(self) -> StepHook | None:
        """What the fit loop calls every ``tracking.log_every_steps`` steps; None when no sink is set."""
        if not self.enabled:
            return None
        from unipt.train.fit import StepHook

        return StepHook(self.config.log_every_steps, self._step)

    def start(self, experiment: ExperimentConfig, tags: dict[str, str]) -> None:
        """Open the sinks, log the config as params and ``tags`` (fingerprint, cache key) as tags."""
        self._config = flatten(experiment.model_dump(mode="json"))
        self._hparams = {key: _hparam_value(value) for key, value in self._config.items()}
        if self.config.mlflow is not None:
            self._start_mlflow(experiment, tags)
        if self.config.tensorboard is not None:
            require("tensorboard", "tracking.tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            log_dir = Path(self.config.tensorboard).expanduser() / self.run_id
            self._tensorboard = SummaryWriter(log_dir=str(log_dir))
            config_yaml = yaml.safe_dump(experiment.model_dump(mode="json"), sort_keys=False)
            self._tensorboard.add_text("config", f"```\n{config_yaml}```")
            self._tensorboard.add_text("tags", "\n\n".join(f"{k}: {v}" for k, v in sorted(tags.items())))
            say(f"tracking: TensorBoard events in {log_dir}")

    def _start_mlflow(self, experiment: ExperimentConfig, tags: dict[str, str]) -> None:
        require("mlflow", "tracking.mlflow")
        uri = mlflow_uri(self.config.mlflow)
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless told otherwise; a config that names a directory chose it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment.name)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment.name)
        tags = {"unipt.run_id": self.run_id, **tags}
        run = client.create_run(experiment_id, run_name=self.run_id, tags=tags)
        self._mlflow, self.mlflow_run_id = client, run.info.run_id
        from mlflow.entities import Param

        params = [Param(key, _param_value(value)) for key, value in sorted(self._config.items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(self.mlflow_run_id, params=params[start : start + 100])
        say(f"tracking: MLflow run {self.mlflow_run_id} in experiment {experiment.name!r} at {uri}")

    def epoch(self, epoch: int, record: dict[str, Any] | None = None) -> None:
        """One finished epoch's history record (``train_loss``, ``lr``, ``val_*``); the fit loop's
        ``on_epoch_end``."""
        if not record or epoch in self._logged_epochs:
            return
        self._logged_epochs.add(epoch)
        values = {k: v for k, v in record.items() if k not in ("epoch", "seconds") and _finite(v)}
        self._log(values, epoch)

    def _step(self, step: int, values: dict[str, float]) -> None:
        # A diverged step's inf/NaN loss is left out, as the epochs' are: the curve ends where it broke.
        self._log({k: v for k, v in values.items() if _finite(v)}, step)

    def finish(self, run_dir: Path, history: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
        """Epochs not seen live (those before a resume), the final metrics and the run's files."""
        for record in history:
            self.epoch(int(record["epoch"]), record)
        final_step = max((int(r["epoch"]) for r in history), default=0)
        finals = {k: v for k, v in flatten(metrics).items() if _finite(v)}
        if self._mlflow is not None:
            self._log_mlflow({f"final.{k}": v for k, v in finals.items()}, final_step)
            for name in ARTIFACT_FILES:
                if (run_dir / name).is_file():
                    self._mlflow.log_artifact(self.mlflow_run_id, str(run_dir / name))
            if self.config.mlflow_log_model:
                self._log_model(self._mlflow, self.mlflow_run_id, run_dir)  # checked in __init__
            self._mlflow.set_terminated(self.mlflow_run_id, "FINISHED")
        if self._tensorboard is not None:
            for key, value in finals.items():
                self._tensorboard.add_scalar(f"final/{key}", float(value), final_step)
            self._write_hparams({f"final/{key}": float(value) for key, value in finals.items()})
            self._tensorboard.close()

    def _write_hparams(self, metrics: dict[str, float]) -> None:
        """The HPARAMS view's entry for this run, in the run's own folder (``add_hparams`` would open a
        sub-run of its own): the config as hyperparameters; the metrics are the ``final/*`` scalars."""
        from torch.utils.tensorboard.summary import hparams

        writer = self._tensorboard._get_file_writer()
        for summary in hparams(self._hparams, metrics):
            writer.add_summary(summary)

    def fail(self) -> None:
        """Close the sinks of a run that raised: MLflow marks it FAILED."""
        if self._mlflow is not None:
            self._mlflow.set_terminated(self.mlflow_run_id, "FAILED")
        if self._tensorboard is not None:
            self._tensorboard.close()

    def ids(self) -> dict[str, str]:
        """Where the run is in each sink: what the record and the registry keep."""
        ids = {}
        if self.mlflow_run_id is not None:
            ids["mlflow_uri"] = mlflow_uri(self.config.mlflow)
            ids["mlflow_run_id"] = self.mlflow_run_id
        if self._tensorboard is not None:
            ids["tensorboard_dir"] = str(Path(self._tensorboard.log_dir).resolve())
        return ids

    def _log(self, values: dict[str, float], step: int) -> None:
        self._log_mlflow(values, step)
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(_tensorboard_tag(key), float(value), step)
            self._tensorboard.flush()

    def _log_mlflow(self, values: dict[str, float], step: int) -> None:
        if self._mlflow is None or not values:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in values.items()]
        self._mlflow.log_batch(self.mlflow_run_id, metrics=metrics)


def mlflow_uri(value: str | None) -> str:
    """A tracking URI as MLflow takes it: a plain path (a local file store) becomes a ``file:`` URI."""
    assert value is not None
    if "://" in value or value.startswith(("file:", "databricks")):
        return value
    return Path(value).expanduser().resolve().as_uri()


def _tensorboard_tag(key: str) -> str:
    """``val_acc`` -> ``val/acc``, ``train_loss`` -> ``train/loss``: TensorBoard groups by the prefix."""
    for split in ("train_", "val_", "test_"):
        if key.startswith(split):
            return f"{split[:-1]}/{key[len(split) :]}"
    return f"train/{key}" if key == "lr" else key


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    text = text.removesuffix("\n...").strip()
    return text[:_MAX_PARAM_CHARS]


def _hparam_value(value: Any) -> bool | int | float | str:
    """A config value as the HPARAMS view takes it: numbers, flags and text as they are, the rest as text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return _param_value(value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
