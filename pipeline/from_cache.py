"""What a committed cache says about the inputs it was built from, so training needs nothing else.

A cache's attributes hold the dataset fingerprint, the backbone's identity (name, revision, hashes), the
stored layers, max length, dtype and autocast, and ``examples.parquet`` holds every label and split.
Training on another machine therefore needs neither the dataset source nor the backbone files: this
module turns those attributes into a config (:func:`config_from_cache`), a dataset table
(:func:`dataset_from_cache`) and a backbone identity (:func:`identity_from_cache`), and finds where a
config and a cache disagree on a setting that decides the cache's bytes (:func:`setting_conflicts`).

Light on purpose: ``unipt train --cache`` imports it, and that process must never load a backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.bundled import is_bundled
from pipeline.cache import ActivationCache
from pipeline.config import BackboneConfig, ExperimentConfig, apply_overrides
from pipeline.datasets import DatasetTable
from pipeline.errors import UniptError
from pipeline.identity import BackboneIdentity, cache_key
from pipeline.log import say

CACHE_SOURCE = "cache:"  # dataset.source of a config made from a cache alone


def key_fields_of(reader: ActivationCache) -> dict[str, Any]:
    fields = reader.attrs.get("key_fields")
    if not isinstance(fields, dict) or "backbone" not in fields:
        raise UniptError(
            f"cache {reader.source} does not record what it was built from (no key_fields); "
            "train it with the config it was extracted with"
        )
    return fields


def key_of(reader: ActivationCache) -> str:
    """The key of the cache actually read (what run records and `unipt cache gc` must see)."""
    key = reader.attrs.get("cache_key")
    return str(key) if key else cache_key(key_fields_of(reader))


def config_from_cache(
    reader: ActivationCache, overrides: list[str] | None = None, storage: dict[str, Any] | None = None
) -> ExperimentConfig:
    """The config a cache implies: its backbone and extraction settings, ``train.*`` defaults, then
    ``overrides`` (``train.lr=5e-4``, ``seed=1``, ...) and ``storage`` settings."""
    fields = key_fields_of(reader)
    layout = reader.layout
    backbone = reader.attrs.get("backbone") or {}
    raw: dict[str, Any] = {
        "name": f"cache-{key_of(reader)[:12]}",
        "dataset": {"source": f"{CACHE_SOURCE}{reader.source}"},
        "backbone": {
            "name_or_path": str(backbone.get("name") or "unknown"),
            "revision": fields["backbone"].get("revision"),
            "layers": fields.get("layers", "all"),
            "max_length": fields.get("max_length", layout.max_length),
        },
        "extract": {
            "dtype": fields.get("dtype", reader.dtype),
            "autocast": fields.get("autocast", "none"),
            "shard_size": layout.shard_size,
            "chunk_rows": layout.chunk_rows,
            "codec": layout.codec,
            "shuffle": layout.shuffle,
            "compression_level": layout.compression_level,
            "blosc_blocksize": layout.blosc_blocksize,
            "chunks_per_file": layout.chunks_per_file,
        },
        "storage": dict(storage or {}),
    }
    config = _validated(apply_overrides(raw, list(overrides or [])))
    recorded = last_run_settings(config.storage.registry, key_of(reader))
    if recorded is None:
        train = config.train
        say(
            f"no registered run trained on cache {key_of(reader)[:12]}: train.* defaults (epochs "
            f"{train.epochs}, lr {train.lr}, batch_size {train.batch_size}, variant {train.variant}); "
            "--set train.NAME=VALUE to change one"
        )
        return config
    run_id, settings = recorded
    try:
        reused = _validated(apply_overrides(raw | settings, list(overrides or [])))
    except UniptError:  # a record from a unipt with other train.* settings: the defaults, said so
        say(f"run {run_id}'s training settings do not fit this unipt's config: train.* defaults instead")
        return config
    say(
        f"train.* and seed from run {run_id}, the last registered run on this cache (epochs "
        f"{reused.train.epochs}, lr {reused.train.lr}); --set train.NAME=VALUE to change one"
    )
    return reused


def _validated(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise UniptError(f"--set {where}: {error['msg']}; fix the override") from exc


def last_run_settings(registry: str | Path, key: str) -> tuple[str, dict[str, Any]] | None:
    """(run id, its ``train`` and ``seed`` settings) of the last run registered in ``registry`` that
    trained on the cache ``key``; None when there is none (or no registry yet)."""
    from pipeline.registry import Registry

    if not Path(registry).expanduser().is_file():
        return None
    with Registry(registry, create=False) as runs:
        entries = [e for e in runs.list() if key == e.cache_key or key in e.cache_keys.values()]
    for entry in reversed(entries):
        train = entry.config.get("train")
        if isinstance(train, dict):
            return entry.run_id, {"train": train, "seed": entry.config.get("seed", entry.seed)}
    return None


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
    fingerprint = reader.attrs.get("dataset_fingerprint") or key_fields_of(reader).get("dataset_fingerprint")
    return DatasetTable(reader.examples, list(reader.label_names), str(fingerprint), source)


def identity_from_cache(reader: ActivationCache) -> BackboneIdentity:
    fields = key_fields_of(reader)["backbone"]
    return BackboneIdentity(
        name=str((reader.attrs.get("backbone") or {}).get("name") or "unknown"),
        revision=fields.get("revision"),
        weights_sha256=fields.get("weights_sha256", ""),
        config_sha256=fields.get("config_sha256", ""),
        tokenizer_sha256=fields.get("tokenizer_sha256", ""),
        local_dir="",  # nothing on this machine
    )


def setting_conflicts(config: ExperimentConfig, reader: ActivationCache) -> list[tuple[str, Any, Any]]:
    """(setting, config's value, cache's value) for each setting deciding the cache's bytes on which the
    primary backbone's config and the cache disagree."""
    fields = key_fields_of(reader)
    backbone = config.primary_backbone
    conflicts = []
    cached_layers = fields.get("layers", "all")
    # The same layers named two ways ("all", or the list it resolved to) are the same bytes.
    if backbone.layers != cached_layers and backbone.layers != reader.layers:
        conflicts.append(("backbone.layers", backbone.layers, cached_layers))
    for setting, mine, theirs in (
        ("backbone.max_length", backbone.max_length, fields.get("max_length")),
        ("extract.dtype", config.extract.dtype, fields.get("dtype", reader.dtype)),
        ("extract.autocast", config.extract.autocast, fields.get("autocast", "none")),
    ):
        if mine != theirs:
            conflicts.append((setting, mine, theirs))
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


def config_for_cache(cache: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """:func:`config_from_cache` for a cache by path, URL or .h5 file."""
    from pipeline.cache_open import open_cache

    with open_cache(cache) as reader:
        return config_from_cache(reader, overrides)
