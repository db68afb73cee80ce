"""Experiment configuration: a validated YAML file plus ``--set key=value`` overrides.

Unknown keys and wrong types are errors (``extra="forbid"``): a typo in a config must never
silently fall back to a default and produce a different experiment. Each field says what it changes
(:mod:`~unipt.pipeline.config.declared`); configs written by older versions are upgraded by the rules in
:mod:`~unipt.pipeline.config.compat`, the one place they are written.

The sections live in :mod:`~unipt.pipeline.config.sections` (dataset, backbone, extract),
:mod:`~unipt.pipeline.config.training` (train) and :mod:`~unipt.pipeline.config.experiment_config` (storage,
tracking, the whole experiment); reading a file in :mod:`~unipt.pipeline.config.loading`. Every name is
imported from here.
"""

from unipt.pipeline.config.compat import (
    AMP_ALIASES,
    BEFORE_IT_EXISTED,
    RENAMED,
    amp_word,
    upgrade,
    upgrade_key_fields,
)
from unipt.pipeline.config.declared import (
    AFFECTS,
    Affects,
    affects,
    names_affecting,
    section_model,
    settings_affecting,
    undeclared,
)
from unipt.pipeline.config.experiment_config import (
    PRIMARY_BACKBONE,
    ExperimentConfig,
    StorageConfig,
    TrackingConfig,
)
from unipt.pipeline.config.loading import (
    _describe as _describe,  # the one-line form of a validation error, for other validators
)
from unipt.pipeline.config.loading import (
    apply_overrides,
    load_config,
    parse_override,
    parse_value,
    validate_stored,
)
from unipt.pipeline.config.sections import BackboneConfig, DatasetConfig, ExtractConfig, SplitConfig
from unipt.pipeline.config.training import TrainConfig

__all__ = [
    "AFFECTS",
    "AMP_ALIASES",
    "BEFORE_IT_EXISTED",
    "PRIMARY_BACKBONE",
    "RENAMED",
    "Affects",
    "BackboneConfig",
    "DatasetConfig",
    "ExperimentConfig",
    "ExtractConfig",
    "SplitConfig",
    "StorageConfig",
    "TrackingConfig",
    "TrainConfig",
    "affects",
    "amp_word",
    "apply_overrides",
    "load_config",
    "names_affecting",
    "parse_override",
    "parse_value",
    "section_model",
    "settings_affecting",
    "undeclared",
    "upgrade",
    "upgrade_key_fields",
    "validate_stored",
]
