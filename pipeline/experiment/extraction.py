"""Extract: stage 1 of :mod:`unipt.pipeline.experiment.recipe`, each backbone's cache built once (a cache
hit costs nothing). The extraction stack (Ray, the backbones) is imported only when a cache is built, so
training never loads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from unipt.extract.spec import BackboneLoadSpec, load_spec_for
from unipt.pipeline.experiment.preparation import Prepared, PreparedBackbone
from unipt.pipeline.log import human_bytes, say

if TYPE_CHECKING:
    from unipt.extract.runner import ExtractionResult


def extract_all(
    prep: Prepared, *, ray_address: str | None = None, progress: bool = True
) -> dict[str, ExtractionResult]:
    """Every backbone's cache, each extracted once (a cache hit costs nothing)."""
    return {name: extract(prep, name, ray_address=ray_address, progress=progress) for name in prep.backbones}


def extract(
    prep: Prepared, backbone: str | None = None, *, ray_address: str | None = None, progress: bool = True
) -> ExtractionResult:
    """Build (or find) one backbone's cache; the primary backbone's when ``backbone`` is None."""
    # Imported here: Ray and the backbones are the [extract] extra, and training never loads them.
    from unipt.extract.runner import ExtractionRequest, run_extraction

    target = prep.backbones[backbone] if backbone is not None else prep.primary
    settings = target.config
    label = f" [{target.name}]" if len(prep.backbones) > 1 else ""
    hit_before = prep.cache_root.has(target.key)
    if hit_before:
        say(
            f"cache hit {target.key}{label}: reusing {prep.cache_root.location(target.key)} "
            "(no backbone forward pass)"
        )
    else:
        # Not "cache miss" yet: a view over activations its space already holds extracts nothing (and
        # is recorded as a hit); which of the two it was is said once the extraction knows.
        counts = prep.dataset.split_counts()
        say(
            f"no cache {target.key}{label} yet: a view of {len(prep.dataset)} examples "
            f"(train {counts['train']}, val {counts['val']}, test {counts['test']}) "
            f"with {settings.name_or_path}"
        )
    name = settings.name_or_path
    request = ExtractionRequest(
        key=target.key,
        key_fields=target.key_fields,
        cache_root=prep.cache_root,
        examples=prep.dataset.table,
        label_names=prep.dataset.label_names,
        load_spec=load_spec(target, prep.config.extract.autocast),
        backbone=settings,
        extract=prep.config.extract,
        backbone_name=name,
    )
    result = run_extraction(request, ray_address=ray_address, progress=progress)
    if result.cache_hit and not hit_before:
        say(
            f"cache {target.key}{label}: view written over existing activations, nothing extracted "
            f"(recorded as a cache hit) -> {result.path}"
        )
    if not result.cache_hit:
        resumed = ""
        if result.shards_resumed:  # the tokens and bytes above are this run's shards only
            shards = result.shards_resumed + result.shards_run
            resumed = f", {result.shards_resumed} of {shards} shards resumed (tokens and bytes: this run's)"
        stats = result.stats
        workers = f"{result.workers}"
        if result.shards_run and result.workers_used < result.workers:  # some never ran a shard: say so
            workers = f"{result.workers_used} of {result.workers}"
        say(
            f"cache miss {target.key}{label}: extracted {result.examples} examples, {result.tokens} tokens, "
            f"{human_bytes(result.bytes_written)} written in {result.seconds:.1f}s "
            f"({stats.get('forward_s', 0):.1f}s backbone, {stats.get('write_s', 0):.1f}s writes overlapped) "
            f"on {workers} worker(s){resumed} -> {result.path}"
        )
    return result


def load_spec(target: PreparedBackbone, autocast: str, device: str = "auto") -> BackboneLoadSpec:
    """How a worker (or ``unipt plan``) loads ``target``: exactly the files its identity hashed."""
    return load_spec_for(target.config, target.identity, autocast, device)


def built_keys(prep: Prepared, extractions: dict[str, ExtractionResult]) -> frozenset[str]:
    """Keys of the caches these extractions wrote (misses): new content, not yet read by any run."""
    return frozenset(prep.backbones[name].key for name, result in extractions.items() if not result.cache_hit)


@contextmanager
def leased(extractions: dict[str, ExtractionResult]) -> Iterator[None]:
    """Hold the extractions' read leases for the block, then let `unipt cache gc` see them again."""
    try:
        yield
    finally:
        for result in extractions.values():
            result.release()
