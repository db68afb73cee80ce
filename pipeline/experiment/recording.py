"""Record, the last step of :mod:`unipt.pipeline.experiment.recipe`: the run record
(:func:`unipt.pipeline.runs.records.run_record`), the tuned model's files, the plots and the registry entry;
and a finished run's result read back from its record."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unipt.pipeline.errors import UniptError
from unipt.pipeline.experiment.preparation import Prepared
from unipt.pipeline.experiment.training import Trained
from unipt.pipeline.extras import has, install_hint
from unipt.pipeline.log import say
from unipt.pipeline.model.files import write_model
from unipt.pipeline.runs.records import (
    RECORD_FILE,
    new_run_id,
    read_run_record,
    run_record,
    write_run_record,
)
from unipt.pipeline.runs.registration import register_run, registry_id
from unipt.pipeline.tasks import get_task
from unipt.train.plots import write_report_plots, write_run_plots


@dataclass
class Timings:
    extract_s: float
    train_s: float
    total_s: float

    def as_dict(self) -> dict[str, float]:
        return {"extract_s": self.extract_s, "train_s": self.train_s, "total_s": self.total_s}


def timings_since(started: float, train_started: float, extract_s: float) -> Timings:
    now = time.perf_counter()
    return Timings(round(extract_s, 3), round(now - train_started, 3), round(now - started, 3))


@dataclass
class RunResult:
    run_dir: Path
    trained: Trained
    timings: Timings
    cache_hit: bool

    @property
    def run_id(self) -> str:
        return self.run_dir.name


def fresh_run_id(prep: Prepared) -> str:
    """A new run's id: time-ordered, unique, with a hash of its config and cache key."""
    return new_run_id({"config": prep.config.model_dump(mode="json"), "cache_key": prep.key})


def record(
    prep: Prepared,
    trained: Trained,
    cache_hit: bool,
    timings: Timings,
    extra: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> Path:
    """Write the run record and plots, register the run; ``extra`` adds lineage (rerun_of, sweep, ...).

    ``run_id``: the id chosen before training (its directory may already hold the run's checkpoint).
    """
    storage = prep.config.storage
    doc = run_record(
        run_id or fresh_run_id(prep),
        prep.config,
        prep.dataset,
        prep.backbones,
        trained,
        cache_hit,
        timings.as_dict(),
        registry=registry_id(storage.registry),
        extra=extra,
    )
    run_dir = write_run_record(storage.runs_root, doc)
    if trained.model_state is not None and trained.model_spec is not None:
        # The product of the run: the best epoch's model, loadable without the checkpoint or the run.
        spec = dataclasses.replace(
            trained.model_spec,
            metrics=dict(trained.metrics),
            warnings=list(trained.warnings or []),
            run_id=doc["run_id"],
        )
        write_model(run_dir, trained.model_state, spec)
    write_plots(run_dir, trained)
    register_run(storage.registry, doc, run_dir)
    return run_dir


def write_plots(run_dir: Path, trained: Trained) -> None:
    """The run's curves, layer weights and (classification) confusion matrices, with the [plots] extra."""
    if not has("matplotlib"):  # a lean install trains and records all the same; only the pictures need it
        hint = install_hint("matplotlib")
        say(f"plots skipped: matplotlib is not installed ({hint}); record.json has the numbers")
        return
    names = trained.layer_names or [f"#{i}" for i in range(len(trained.layer_weights))]
    metric = get_task(trained.task).val_metric
    write_run_plots(run_dir, trained.history, trained.layer_weights, names, metric=metric)
    write_report_plots(run_dir, trained.report)


def recorded_result(run_dir: Path) -> RunResult:
    """A finished run's result as its record.json holds it (no model state: that is in model.json)."""
    doc = read_run_record(run_dir)
    try:
        trained = Trained(
            task=doc["task"]["name"],
            metrics=dict(doc["metrics"]),
            history=list(doc.get("history") or []),
            layer_weights=list(doc.get("layer_weights") or []),
            layer_names=[],
            cache_source=str(doc["cache"]["path"]),
            cache_bytes=int(doc["cache"]["bytes_on_disk"]),
            gallery_layer_weights=doc.get("gallery_layer_weights"),
            runtime=dict(doc.get("runtime") or {}),
            select_metric=doc["task"].get("select_metric"),
            report=doc.get("report"),
        )
        took = doc["timings"]
        timings = Timings(float(took["extract_s"]), float(took["train_s"]), float(took["total_s"]))
        return RunResult(run_dir, trained, timings, bool(doc["cache"]["hit"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise UniptError(
            f"run record {run_dir / RECORD_FILE} lacks {exc} or holds the wrong type there; it was edited "
            f"or is not unipt's: `unipt runs show {run_dir.name}` shows what the registry has"
        ) from exc
