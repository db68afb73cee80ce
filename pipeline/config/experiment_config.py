"""The whole experiment: where its files go, where it is reported, and its sections together."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from unipt.pipeline.config.declared import _Strict, affects
from unipt.pipeline.config.sections import BackboneConfig, DatasetConfig, ExtractConfig
from unipt.pipeline.config.training import TrainConfig
from unipt.pipeline.storage import (
    DEFAULT_CACHE_ROOT,
    DEFAULT_REGISTRY,
    DEFAULT_RUNS_ROOT,
    check_no_secrets,
    check_url,
)
from unipt.pipeline.tasks import get_task


class StorageConfig(_Strict):
    # Unset, each comes from $UNIPT_HOME (else .unipt), as for commands that take no config.
    cache_root: str = Field(
        default_factory=lambda: DEFAULT_CACHE_ROOT,
        description="A directory or an fsspec URL such as s3://bucket/caches.",
        json_schema_extra=affects(None, default_text="`$UNIPT_HOME/cache`, else `.unipt/cache`"),
    )
    runs_root: str = Field(
        default_factory=lambda: DEFAULT_RUNS_ROOT,
        description="Where run folders (record.json, model, plots) go.",
        json_schema_extra=affects(None, default_text="`$UNIPT_HOME/runs`, else `.unipt/runs`"),
    )
    registry: str = Field(
        default_factory=lambda: DEFAULT_REGISTRY,
        description="SQLite run registry (`unipt runs`, `rerun`, `sweep`).",
        json_schema_extra=affects(
            None, default_text="`$UNIPT_HOME/registry.sqlite`, else `.unipt/registry.sqlite`"
        ),
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for a URL cache_root (e.g. endpoint_url); credentials come from the "
        "environment, never from here.",
        json_schema_extra=affects(None),
    )

    @field_validator("options")
    @classmethod
    def _no_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        check_no_secrets(options)
        return options

    @field_validator("cache_root")
    @classmethod
    def _no_password_in_the_url(cls, cache_root: str) -> str:
        check_url(cache_root, "storage.cache_root")
        return cache_root


class TrackingConfig(_Strict):
    """Where a run is also reported (the run record and the registry stay the source of truth)."""

    tensorboard: str | None = Field(
        None,
        description="A directory for TensorBoard event files: each run writes <dir>/<run_id>/ (train loss "
        "per step and per epoch, validation metrics per epoch, final metrics, the config, the HPARAMS "
        "view). None = off. Needs [tracking].",
        json_schema_extra=affects(None),
    )
    mlflow: str | None = Field(
        None,
        description="An MLflow tracking URI (http(s)://server, sqlite:///mlflow.db) or a directory (a local "
        "file store): per-epoch and final metrics, the config as params, dataset fingerprint and cache key "
        "as tags, plots and model.safetensors as artifacts, in the experiment named by `name`. None = off. "
        "Needs [tracking].",
        json_schema_extra=affects(None),
    )
    log_every_steps: int = Field(
        10,
        ge=1,
        description="Log the training loss (and learning rate) to the sinks every this many optimiser "
        "steps: the loss curve, beside the per-epoch numbers.",
        json_schema_extra=affects(None),
    )
    mlflow_log_model: bool = Field(
        False,
        description="Also log the tuned model to the MLflow run as an MLflow pyfunc model (artifact "
        "`model/`), which `mlflow.pyfunc.load_model` loads and MLflow's model registry can serve; "
        "it predicts from texts with the backbone model.json names. Needs `mlflow`.",
        json_schema_extra=affects(None),
    )

    @field_validator("mlflow")
    @classmethod
    def _no_password_in_the_uri(cls, uri: str | None) -> str | None:
        if uri is not None:
            check_url(uri, "tracking.mlflow")
        return uri

    @model_validator(mode="after")
    def _a_model_needs_an_mlflow_run(self) -> TrackingConfig:
        if self.mlflow_log_model and self.mlflow is None:
            raise ValueError(
                "tracking.mlflow_log_model logs the model to the run's MLflow run; set tracking.mlflow too "
                "(a tracking URI or a directory)"
            )
        return self


_BACKBONE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


class ExperimentConfig(_Strict):
    name: str = Field(
        description="Experiment name (runs, MLflow).",
        json_schema_extra=affects(None, default_text="the config file's name without `.yaml`"),
    )
    seed: int = Field(
        0, description="Seed of training (initialisation, shuffling).", json_schema_extra=affects("training")
    )
    dataset: DatasetConfig
    backbone: BackboneConfig | None = Field(None, description="The one backbone (or use `backbones`).")
    backbones: dict[str, BackboneConfig] | None = Field(
        None,
        description="Several backbones over the same dataset, by name (e.g. {image: ..., text: ...} for "
        "retrieval); each is extracted once into its own cache. The first one is the primary.",
        json_schema_extra=affects("cache"),
    )
    extract: ExtractConfig = ExtractConfig()
    train: TrainConfig = TrainConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = Field(
        TrackingConfig(), description="Report runs to TensorBoard and/or MLflow too (off by default)."
    )

    @model_validator(mode="after")
    def _one_backbone_section(self) -> ExperimentConfig:
        if (self.backbone is None) == (self.backbones is None):
            raise ValueError(
                "give exactly one of `backbone` (one model) or `backbones` (a mapping name -> model)"
            )
        if self.backbones is not None:
            if not self.backbones:
                raise ValueError("`backbones` is empty; name at least one model")
            bad = [name for name in self.backbones if not _BACKBONE_NAME.match(name)]
            if bad:
                raise ValueError(
                    f"backbone names {bad} must be letters, digits, '-' or '_' (e.g. text, image)"
                )
        return self

    @model_validator(mode="after")
    def _enough_backbones_for_the_task(self) -> ExperimentConfig:
        if get_task(self.train.task).caches < 2:
            return self
        names = list(self.named_backbones)
        if len(names) < 2:
            raise ValueError(
                f"train.task {self.train.task} needs two backbones over one dataset: name them under "
                "`backbones` (e.g. {image: ..., text: ...})"
            )
        pair = self.train.retrieval_pair or names[:2]
        unknown = [name for name in pair if name not in names]
        if unknown or pair[0] == pair[1]:
            raise ValueError(f"train.retrieval_pair must name two different backbones of {names}, got {pair}")
        return self

    @property
    def retrieval_pair(self) -> tuple[str, str]:
        """(query, gallery) backbone names for task retrieval."""
        pair = self.train.retrieval_pair or list(self.named_backbones)[:2]
        return pair[0], pair[1]

    @property
    def named_backbones(self) -> dict[str, BackboneConfig]:
        """Every backbone by name, the primary first; a single ``backbone`` is named ``main``."""
        if self.backbones is not None:
            return dict(self.backbones)
        assert self.backbone is not None  # the validator guarantees one of the two
        return {PRIMARY_BACKBONE: self.backbone}

    @property
    def primary_backbone(self) -> BackboneConfig:
        return next(iter(self.named_backbones.values()))


PRIMARY_BACKBONE = "main"
