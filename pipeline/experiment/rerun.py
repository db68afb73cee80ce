"""Redo a registered run from its stored config, and compare what it gives with what it gave.

The rerun goes through the recipe (:mod:`unipt.pipeline.experiment.recipe`) like any run: the dataset is
reloaded and refused if it changed (unless the caller allows new data: then the new run is linked to the old),
a removed cache is rebuilt, and training restores the original run's torch thread count so CPU sums
come out bit for bit. On a machine that holds only the run's cache (no dataset source, no backbone
files), the rerun trains from that cache alone and says the dataset was not re-checked.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from unipt.pipeline import experiment
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.config import ExperimentConfig, validate_stored
from unipt.pipeline.errors import UniptError
from unipt.pipeline.log import say
from unipt.pipeline.runs.compare import differences, result_metrics
from unipt.pipeline.runs.records import without_nan
from unipt.pipeline.runs.registry import Registry, RunEntry


@dataclass
class RerunResult:
    old: RunEntry
    new: experiment.RunResult
    lineage: dict[str, Any]  # {"rerun_of": id} or {"parent_run_id": id, ...} for changed inputs
    differences: list[tuple[str, Any, Any]]  # metrics (timings aside) that differ: (name, old, new)

    @property
    def is_rerun(self) -> bool:
        """True for a like-for-like rerun, False when it ran on changed data or backbone files."""
        return "rerun_of" in self.lineage

    @property
    def matches(self) -> bool:
        return not self.differences


def stored_config(old: RunEntry, registry: str) -> ExperimentConfig:
    """The config a run was made with, joined to ``registry``; a CPU run stays on the CPU."""
    raw = json.loads(json.dumps(old.config))
    raw.setdefault("storage", {})["registry"] = registry  # the new run joins the old one's registry
    if old.runtime.get("device") == "cpu" and raw.get("train", {}).get("device", "auto") == "auto":
        import torch

        if torch.cuda.is_available():
            # The original trained on CPU; "auto" would pick this GPU and change the numbers.
            raw.setdefault("train", {})["device"] = "cpu"
    # A record of an older unipt may use old names and lack settings added since: the compatibility rules.
    return validate_stored(raw, f"run {old.run_id}")


def _lineage(old: RunEntry, prep: experiment.Prepared, allow_new_data: bool) -> dict[str, Any]:
    new_fp = prep.dataset.fingerprint
    if new_fp != old.dataset_fingerprint:
        if not allow_new_data:
            raise UniptError(
                f"dataset {prep.dataset.source} changed since run {old.run_id}: its fingerprint was "
                f"{old.dataset_fingerprint}, now {new_fp}; restore the original data, or pass "
                "--allow-new-data to train on the new data as a new run linked to the old one"
            )
        say(
            f"dataset changed (fingerprint {old.dataset_fingerprint[:12]} -> {new_fp[:12]}): "
            f"training on the new data as a new run linked to {old.run_id}"
        )
        return {
            "parent_run_id": old.run_id,
            "data_changed": {"old_fingerprint": old.dataset_fingerprint, "new_fingerprint": new_fp},
        }
    if prep.key != old.cache_key:
        changed = [key for key, _, _ in differences(old.cache_key_fields, prep.key_fields)]
        if not allow_new_data:
            raise UniptError(
                f"run {old.run_id} used cache {old.cache_key}, this machine gives {prep.key} for its "
                f"config (changed: {', '.join(changed) or 'cache key fields'}); restore the original "
                "backbone files, or pass --allow-new-data to run anyway as a new run linked to the old one"
            )
        say(f"cache inputs changed ({', '.join(changed)}): a new run linked to {old.run_id}")
        return {"parent_run_id": old.run_id, "cache_changed": changed}
    return {"rerun_of": old.run_id}


def _prepare_from_cache_alone(
    old: RunEntry, config: ExperimentConfig, missing: UniptError
) -> experiment.Prepared:
    """The run's inputs are not all here (``missing`` says which): train from its cache if it still exists,
    in the cache root under its key or where the run read it."""
    root = CacheRoot(config.storage.cache_root, config.storage.options)
    candidates = []
    if old.cache_key and root.has(old.cache_key):
        candidates.append(str(root.location(old.cache_key)))
    recorded = old.artifacts.get("cache")
    if recorded and recorded != "None":
        candidates.append(recorded)
    for location in candidates:
        try:
            prep = experiment.prepare_for_cache(location, config)
        except UniptError:
            continue  # not there, or not this run's cache: try the next
        if prep.key == old.cache_key:
            say(
                f"{missing}: training from cache {old.cache_key} alone ({location}); "
                "the dataset was not re-checked"
            )
            return prep
    raise UniptError(
        f"{str(missing).rstrip('.')}; and run {old.run_id}'s cache {old.cache_key} is not here either"
    )


def rerun(
    run_id: str,
    registry: str,
    *,
    allow_new_data: bool = False,
    ray_address: str | None = None,
    progress: bool = True,
) -> RerunResult:
    """Redo run ``run_id`` of ``registry`` and compare its metrics with the original's."""
    started = time.perf_counter()
    with Registry(registry, create=False) as runs:
        old = runs.get(run_id)
    config = stored_config(old, registry)
    try:
        prep = experiment.prepare(config)
    except UniptError as missing:
        prep = _prepare_from_cache_alone(old, config, missing)
    lineage = _lineage(old, prep, allow_new_data)
    if prep.cache is not None:
        lineage["dataset_rechecked"] = False

    # From a cache alone there is nothing to extract: the run's cache is the input.
    extractions = (
        {} if prep.cache else experiment.extract_all(prep, ray_address=ray_address, progress=progress)
    )
    cache_hit = all(r.cache_hit for r in extractions.values())
    extract_s = sum(r.seconds for r in extractions.values())
    train_started = time.perf_counter()
    with experiment.leased(extractions), experiment.torch_threads(old.runtime.get("torch_threads")):
        # A cache that was still here must be the one registered runs read (its root digest); one rebuilt
        # now is new content, which the metric comparison below judges.
        built = experiment.built_keys(prep, extractions)
        trained = experiment.train(prep, progress=progress, built=built)
    timings = experiment.timings_since(started, train_started, extract_s)
    run_dir = experiment.record(prep, trained, cache_hit, timings, lineage)
    new = experiment.RunResult(run_dir, trained, timings, cache_hit)
    # Records keep an undefined metric as null (older ones as NaN): compare both sides that way.
    before, after = without_nan(old.metrics), without_nan(trained.metrics)
    diffs = differences(result_metrics(before), result_metrics(after))
    return RerunResult(old, new, lineage, diffs)
