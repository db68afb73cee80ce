"""Prepare, step 1 of :mod:`unipt.pipeline.experiment.recipe`: what a config (or a cache alone) resolves to
before any stage runs: the dataset and its fingerprint, each backbone's identity and its cache key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.cache.identity import BackboneIdentity, backbone_identity, cache_key, cache_key_fields
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.provenance import (
    CACHE_SOURCE,
    backbone_is_here,
    data_is_here,
    dataset_from_cache,
    identity_difference,
    identity_from_cache,
    key_fields_of,
    key_of,
    setting_conflicts,
)
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.config import BackboneConfig, ExperimentConfig
from unipt.pipeline.data.table import DatasetTable, load_dataset
from unipt.pipeline.errors import UniptError
from unipt.pipeline.experiment.cache_config import config_from_cache
from unipt.pipeline.log import say
from unipt.pipeline.tasks import TaskInfo, get_task


@dataclass
class PreparedBackbone:
    """One backbone of a config: its settings, identity, and the cache key it gets on this dataset."""

    name: str
    config: BackboneConfig
    identity: BackboneIdentity
    key_fields: dict[str, Any]
    key: str


@dataclass
class Prepared:
    """What a config resolves to before any stage runs: the data, the backbones and their cache keys."""

    config: ExperimentConfig
    dataset: DatasetTable
    backbones: dict[str, PreparedBackbone]  # the primary first
    cache_root: CacheRoot
    # An explicit cache (Zarr path/URL or .h5) this was prepared for: training reads it, not the key's
    # location, and the primary backbone's key and key fields are that cache's own.
    cache: str | None = None

    @property
    def task(self) -> TaskInfo:
        return get_task(self.config.train.task)

    @property
    def primary(self) -> PreparedBackbone:
        return next(iter(self.backbones.values()))

    @property
    def key(self) -> str:
        """The primary backbone's cache key: what single-cache training reads."""
        return self.primary.key

    @property
    def key_fields(self) -> dict[str, Any]:
        return self.primary.key_fields

    def training_backbones(self) -> list[PreparedBackbone]:
        """The backbones whose caches the task trains on, in the task's order (retrieval: query, gallery)."""
        if self.task.caches == 1:
            return [self.primary]
        return [self.backbones[name] for name in self.config.retrieval_pair]


def prepare(config: ExperimentConfig) -> Prepared:
    """Load and fingerprint the dataset, identify every backbone, and derive each one's cache key."""
    dataset = load_dataset(config.dataset, task=config.train.task)
    dataset.check_splits()  # before any extraction: an empty val or test split would only give NaNs
    backbones = {}
    for name, backbone_config in config.named_backbones.items():
        identity = backbone_identity(backbone_config)
        fields = cache_key_fields(dataset.fingerprint, identity, backbone_config, config.extract)
        backbones[name] = PreparedBackbone(name, backbone_config, identity, fields, cache_key(fields))
    root = CacheRoot(config.storage.cache_root, config.storage.options)
    return Prepared(config, dataset, backbones, root)


def prepare_for_cache(
    cache: str, config: ExperimentConfig | None = None, overrides: list[str] | None = None
) -> Prepared:
    """Prepare to train from one cache (Zarr path/URL or .h5), needing nothing but the cache.

    Without ``config`` it comes from the cache's attributes with ``train.*`` defaults and ``overrides``.
    The dataset and the backbone are checked against the cache when this machine has them (a cache built
    for other data or another backbone is refused); when it has not, their identities are the cache's.
    A config that disagrees with the cache on a setting that decides its bytes is refused either way.
    """
    options = config.storage.options if config is not None else None
    reader = open_cache(cache, options=options)
    try:
        if config is None:
            config = config_from_cache(reader, overrides)
        name, settings = next(iter(config.named_backbones.items()))
        if data_is_here(config):
            dataset = load_dataset(config.dataset, task=config.train.task)
        else:
            dataset = dataset_from_cache(reader, config.dataset.source)
            if not config.dataset.source.startswith(CACHE_SOURCE):
                say(f"dataset {config.dataset.source} is not here: using the cache's labels, splits and "
                    f"fingerprint {dataset.fingerprint[:12]} (not re-checked)")  # fmt: skip
        here = backbone_is_here(settings)
        identity = backbone_identity(settings) if here else identity_from_cache(reader)
        fields = key_fields_of(reader)
        backbone = PreparedBackbone(name, settings, identity, fields, key_of(reader))
        root = CacheRoot(config.storage.cache_root, config.storage.options)
        prep = Prepared(config, dataset, {name: backbone}, root, cache=str(cache))
        check_cache_matches(prep, reader, backbone_checked=here)
        return prep
    finally:
        release_reader(reader)


def check_cache_matches(prep: Prepared, reader: ActivationCache, backbone_checked: bool = True) -> None:
    """Refuse a cache built for other data, another backbone, or other byte-deciding settings."""
    source = reader.source
    conflicts = setting_conflicts(prep.config, reader)
    if conflicts:
        setting, mine, theirs = conflicts[0]
        raise UniptError(
            f"cache {source} was built with {setting} {_shown(theirs)}, the config says {_shown(mine)}; "
            f"drop {setting} (the cache decides it) or extract a cache with it"
        )
    cached_fp = reader.meta.dataset_fingerprint or key_fields_of(reader).get("dataset_fingerprint")
    if prep.dataset.fingerprint != cached_fp:
        raise UniptError(
            f"cache {source} was built for another dataset (fingerprint {str(cached_fp)[:12]}, the config's "
            f"data has {prep.dataset.fingerprint[:12]}); re-extract for this config"
        )
    if backbone_checked:
        difference = identity_difference(prep.primary.identity, key_fields_of(reader)["backbone"])
        if difference:
            raise UniptError(
                f"cache {source} was built with another backbone than {prep.primary.config.name_or_path} "
                f"({difference}); re-extract for this config"
            )


def release_reader(reader: ActivationCache) -> None:
    """Let go of a reader's leases (Zarr) or file (HDF5): :meth:`ActivationCache.close`."""
    reader.close()


def _shown(value: Any) -> str:
    return str(value).replace(" ", "")
