"""Runs into the registry: a run registers itself from its folder when it finishes, and runs that
stopped between writing record.json and registering are found in the runs root and registered later."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unipt.pipeline.errors import UniptError
from unipt.pipeline.log import log, say
from unipt.pipeline.runs.records import RECORD_FILE, check_run_id
from unipt.pipeline.runs.registry import Registry


def run_artifacts(record: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """A run's files, as the registry lists them: record, config, model, cache, tracking."""
    run_dir = Path(run_dir).expanduser().resolve()
    artifacts = {
        "run_dir": str(run_dir),
        "record": str(run_dir / RECORD_FILE),
        "config": str(run_dir / "config.yaml"),
        "cache": str(record.get("cache", {}).get("path")),
    }
    if (run_dir / "model.json").is_file():  # the tuned model (unipt.pipeline.model.files), for export/predict
        artifacts["model"] = str(run_dir)
    if record.get("tracking"):  # where the run also went (MLflow run id, TensorBoard folder): findable here
        artifacts["tracking"] = record["tracking"]
    return artifacts


def register_run(path: str | Path, record: dict[str, Any], run_dir: str | Path) -> None:
    """Register a run whose record was just written to ``run_dir``; its files are its artifacts."""
    artifacts = run_artifacts(record, run_dir)
    with Registry(path) as registry:
        # Another command may have registered it from its record.json meanwhile (see register_unregistered),
        # before this run wrote all its files: then only the artifacts are brought up to date.
        if not registry.register(record, artifacts, exist_ok=True):
            registry.set_artifacts(record["run_id"], artifacts)


def registry_id(path: str | Path) -> str:
    """How a run record names the registry it is meant for: the absolute path."""
    return str(Path(path).expanduser().resolve())


def read_finished_record(run_dir: Path) -> dict[str, Any]:
    """A run folder's record.json, checked to be a record of that folder's run."""
    path = run_dir / RECORD_FILE
    if path.is_symlink() or run_dir.is_symlink():
        raise UniptError(f"{path} is a symbolic link; unipt registers only records inside the run folder")
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as exc:
        if (run_dir / "checkpoint.pt").is_file():  # unipt.train.checkpoint.CHECKPOINT_FILE (no torch here)
            raise UniptError(
                f"run {run_dir.name} did not finish (a checkpoint.pt, no {RECORD_FILE} in {run_dir}); "
                f"continue it with `unipt train CONFIG --resume {run_dir}` (or run): that registers it"
            ) from exc
        raise UniptError(f"no {RECORD_FILE} in {run_dir}; give the folder of a finished run") from exc
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UniptError(f"run record {path} is unreadable ({type(exc).__name__}); fix or remove it") from exc
    if not isinstance(record, dict) or record.get("run_id") != run_dir.name:
        raise UniptError(
            f"run record {path} is not the record of run {run_dir.name} (its run_id differs or is missing); "
            "it was edited or moved: put it back in its own run folder"
        )
    check_run_id(record["run_id"])
    return record


def register_unregistered(registry: Registry, runs_root: str | Path) -> list[str]:
    """Register every finished run under ``runs_root`` the registry lacks: a run killed after writing its
    record.json but before registering itself. Only records naming this registry (``registry`` in the
    record) count: runs of another registry may share the runs root. Returns their ids; a record that
    cannot be read is left unregistered with a warning (it must not stop this command)."""
    root = Path(runs_root).expanduser()
    if not root.is_dir():
        return []
    known = registry.run_ids()
    registered = []
    for run_dir in sorted(root.iterdir()):
        if run_dir.name in known or not (run_dir / RECORD_FILE).is_file():
            continue
        try:
            record = read_finished_record(run_dir)
        except UniptError as exc:
            log.warning(f"warning: not registering {run_dir}: {exc}")
            continue
        if record.get("registry") != registry_id(registry.path):
            continue  # a run recorded for another registry sharing this runs root (or older than this rule)
        if registry.register(record, run_artifacts(record, run_dir), exist_ok=True):
            registered.append(run_dir.name)
    return registered


def ready_registry(path: str | Path, runs_root: str | Path) -> list[str]:
    """Open the registry at ``path`` (created if new) and check it can be written, before any work whose
    run it will record; then register the finished runs under ``runs_root`` it lacks (their ids)."""
    with Registry(path) as registry:
        registry.check_writable()
        registered = register_unregistered(registry, runs_root)
    if registered:
        say(
            f"registered {len(registered)} finished run(s) that had stopped before registering themselves "
            f"in {path}: {', '.join(registered)}"
        )
    return registered
