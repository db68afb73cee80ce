"""The config a committed cache implies, so ``unipt train --cache`` needs neither the data nor the backbone.

The cache's attributes give the backbone and extraction settings (:mod:`unipt.pipeline.cache.provenance`);
``train.*`` and ``seed`` come from the last registered run on that cache, or the defaults, said so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.cache.provenance import CACHE_SOURCE, key_of, settings_of
from unipt.pipeline.config import ExperimentConfig, apply_overrides, upgrade
from unipt.pipeline.errors import UniptError
from unipt.pipeline.log import say
from unipt.pipeline.runs.registry import Registry


def config_from_cache(
    reader: ActivationCache, overrides: list[str] | None = None, storage: dict[str, Any] | None = None
) -> ExperimentConfig:
    """The config a cache implies: its backbone and extraction settings, ``train.*`` defaults, then
    ``overrides`` (``train.lr=5e-4``, ``seed=1``, ...) and ``storage`` settings."""
    fields = settings_of(reader)
    layout = reader.layout
    backbone = reader.meta.backbone
    raw: dict[str, Any] = {
        "name": f"cache-{key_of(reader)[:12]}",
        "dataset": {"source": f"{CACHE_SOURCE}{reader.source}"},
        "backbone": {
            "name_or_path": str(backbone.get("name") or "unknown"),
            "revision": fields["backbone"].get("revision"),
            "layers": fields["layers"],
            "max_length": fields["max_length"],
        },
        "extract": {
            "dtype": fields["dtype"],
            "autocast": fields["autocast"],
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
        return ExperimentConfig.model_validate(upgrade(raw))  # an override may use an old name, said so
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise UniptError(f"--set {where}: {error['msg']}; fix the override") from exc


def last_run_settings(registry: str | Path, key: str) -> tuple[str, dict[str, Any]] | None:
    """(run id, its ``train`` and ``seed`` settings) of the last run registered in ``registry`` that
    trained on the cache ``key``; None when there is none (or no registry yet)."""
    if not Path(registry).expanduser().is_file():
        return None
    with Registry(registry, create=False) as runs:
        entries = [e for e in runs.list() if key == e.cache_key or key in e.cache_keys.values()]
    for entry in reversed(entries):
        train = entry.config.get("train")
        if isinstance(train, dict):
            # The run's own settings: old names, and what settings added since computed before them.
            train = upgrade({"train": train}, stored=True)["train"]
            return entry.run_id, {"train": train, "seed": entry.config.get("seed", entry.seed)}
    return None


def config_for_cache(cache: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """:func:`config_from_cache` for a cache by path, URL or .h5 file."""
    from unipt.pipeline.cache.opener import open_cache

    with open_cache(cache) as reader:
        return config_from_cache(reader, overrides)
