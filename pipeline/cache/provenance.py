"""What a committed cache says about the inputs it was built from, so training needs nothing else.

A cache's attributes hold the dataset fingerprint, the backbone's identity (name, revision, hashes), the
stored layers, max length, dtype and autocast, and ``examples.parquet`` holds every label and split.
Training on another machine therefore needs neither the dataset source nor the backbone files: this
module turns those attributes into a dataset table (:func:`dataset_from_cache`) and a backbone identity
(:func:`identity_from_cache`), and finds where a config and a cache disagree on a setting that decides the
cache's bytes (:func:`setting_conflicts`); :mod:`unipt.pipeline.experiment.cache_config` makes the config.

Light on purpose: ``unipt train --cache`` imports it, and that process must never load a backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.cache.identity import (
    IN_THE_VIEWS_FIELD,
    THROUGH_THE_IDENTITY,
    BackboneIdentity,
    cache_key,
)
from unipt.pipeline.config import BackboneConfig, ExperimentConfig, settings_affecting, upgrade_key_fields
from unipt.pipeline.data.bundled import is_bundled
from unipt.pipeline.data.table import DatasetTable
from unipt.pipeline.errors import UniptError

CACHE_SOURCE = "cache:"  # dataset.source of a config made from a cache alone


def key_fields_of(reader: ActivationCache) -> dict[str, Any]:
    fields = reader.meta.key_fields
    if "backbone" not in fields:
        raise UniptError(
            f"cache {reader.source} does not record what it was built from (no key_fields); "
            "train it with the config it was extracted with"
        )
    return fields


def settings_of(reader: ActivationCache) -> dict[str, Any]:
    """The cache's key fields with the settings an older cache lacks filled in (the compatibility rules)."""
    return upgrade_key_fields(key_fields_of(reader), dtype=reader.dtype, max_length=reader.layout.max_length)


def key_of(reader: ActivationCache) -> str:
    """The key of the cache actually read (what run records and `unipt cache gc` must see)."""
    key = reader.meta.cache_key
    return str(key) if key else cache_key(key_fields_of(reader))


def data_is_here(config: ExperimentConfig) -> bool:
    source = config.dataset.source
    if source.startswith(CACHE_SOURCE):
        return False
    return is_bundled(source) or Path(source).expanduser().exists()


def backbone_is_here(config: BackboneConfig) -> bool:
    """Whether this machine has the backbone's files without downloading anything."""
    name = config.name_or_path
    if is_bundled(name):
        return True
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return path.is_dir()
    try:  # a hub id: only what the local Hugging Face cache already holds
        from huggingface_hub import snapshot_download

        snapshot_download(name, revision=config.revision, local_files_only=True)
        return True
    except Exception:  # not cached (or no huggingface_hub): nothing here to check against
        return False


def dataset_from_cache(reader: ActivationCache, source: str) -> DatasetTable:
    """The dataset as training sees it: ids, labels and splits from ``examples.parquet``."""
    fingerprint = reader.meta.dataset_fingerprint or key_fields_of(reader).get("dataset_fingerprint")
    return DatasetTable(reader.examples, list(reader.label_names), str(fingerprint), source)


def identity_from_cache(reader: ActivationCache) -> BackboneIdentity:
    fields = key_fields_of(reader)["backbone"]
    return BackboneIdentity(
        name=str(reader.meta.backbone.get("name") or "unknown"),
        revision=fields.get("revision"),
        weights_sha256=fields.get("weights_sha256", ""),
        config_sha256=fields.get("config_sha256", ""),
        tokenizer_sha256=fields.get("tokenizer_sha256", ""),
        local_dir="",  # nothing on this machine
    )


def setting_conflicts(config: ExperimentConfig, reader: ActivationCache) -> list[tuple[str, Any, Any]]:
    """(setting, config's value, cache's value) for each setting deciding the cache's bytes on which the
    primary backbone's config and the cache disagree."""
    fields = settings_of(reader)
    conflicts = []
    # The settings the cache key holds as they are (each field declares whether it affects the cache).
    for section, settings in (
        ("backbone", settings_affecting(config.primary_backbone, "cache", but=THROUGH_THE_IDENTITY)),
        ("extract", settings_affecting(config.extract, "cache", but=IN_THE_VIEWS_FIELD)),
    ):
        for name, mine in settings.items():
            # The same layers named two ways ("all", or the list it resolved to) are the same bytes.
            if mine != fields[name] and not (name == "layers" and mine == reader.layers):
                conflicts.append((f"{section}.{name}", mine, fields[name]))
    return conflicts


def identity_difference(mine: BackboneIdentity, cached: dict[str, Any]) -> str | None:
    """Which hash (or revision) of a backbone differs from the one a cache was built with."""
    have = mine.key_fields()
    names = ["weights_sha256", "config_sha256", "tokenizer_sha256"]
    if cached.get("revision") is not None:  # caches made before hub ids were resolved recorded none
        names.append("revision")
    for name in names:
        if have.get(name) != cached.get(name):
            return f"{name} {str(have.get(name))[:12]} != {str(cached.get(name))[:12]}"
    return None
