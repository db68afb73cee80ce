"""Run records: one directory per run holding everything needed to know and redo it."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import time
import uuid
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from unipt.pipeline.errors import UniptError
from unipt.pipeline.hashing import sha256_json
from unipt.pipeline.log import utc_timestamp

if TYPE_CHECKING:  # only annotations: `unipt runs ls` reads records without loading the data stack
    from unipt.pipeline.config import BackboneConfig, ExperimentConfig
    from unipt.pipeline.data.table import DatasetTable

RECORD_FILE = "record.json"
_PACKAGES = ("unipt-cache", "torch", "transformers", "zarr", "ray", "pyarrow", "numpy")


def new_run_id(identity: dict[str, Any]) -> str:
    """Time-ordered and unique: a timestamp, a hash of what was run, and a random suffix."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{sha256_json(identity)[:8]}-{uuid.uuid4().hex[:4]}"


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_id(run_id: object) -> str:
    """A run id is a directory name under runs_root: refuse anything that could climb out of it."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or ".." in run_id:
        raise UniptError(
            f"run id {run_id!r} is not a plain name (letters, digits, '.', '_', '-'); "
            "a checkpoint or record naming it was edited or is not unipt's"
        )
    return run_id


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def project_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


UNDEFINED_KEY = "undefined"  # record path -> why that value is null


def _why_undefined(path: str) -> str:
    name = path.rsplit(".", 1)[-1]
    if "pearson" in name or "spearman" in name:
        return "a correlation of constant predictions or targets is undefined"
    return "not a finite number (NaN or infinity), so it is recorded as null"


def without_nan(value: Any) -> Any:
    """``value`` with every NaN or infinite float (at any depth) as None: how a record stores it, so a
    fresh result compares equal to a recorded one."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(v) for v in value]
    return value


def finite_record(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with every NaN or infinite float replaced by null, and ``undefined`` saying where and why:
    JSON has no NaN, and a record must load in any strict parser."""
    notes: dict[str, str] = {}

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            notes[path] = _why_undefined(path)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    cleaned = clean(doc, "")
    if notes:
        cleaned[UNDEFINED_KEY] = {**cleaned.get(UNDEFINED_KEY, {}), **notes}
    return cleaned


class RecordedBackbone(Protocol):
    """What a run record says of one backbone (the recipe's ``PreparedBackbone``)."""

    name: str
    config: BackboneConfig
    key: str
    key_fields: dict[str, Any]


class RecordedTraining(Protocol):
    """What a run record says of the training (the recipe's ``Trained``)."""

    task: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    layer_weights: list[float]
    cache_source: str
    cache_bytes: int
    root_digests: dict[str, str | None]
    gallery_layer_weights: list[float] | None
    runtime: dict[str, Any]
    select_metric: str | None
    report: dict[str, Any] | None
    warnings: list[str]

    @property
    def headline(self) -> str: ...


def run_record(
    run_id: str,
    config: ExperimentConfig,
    dataset: DatasetTable,
    backbones: Mapping[str, RecordedBackbone],
    trained: RecordedTraining,
    cache_hit: bool,
    timings: dict[str, float],
    registry: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run record (``record.json``) of a run that trained ``trained`` from the caches of ``backbones``
    (the primary first) on ``dataset``; ``registry``: where it registers itself (``registry_id``), so a
    later command registers it there if it stopped before that; ``extra``: lineage (rerun_of, sweep, ...).
    Strict JSON: an undefined metric (a correlation of constant predictions) is null, with the reason."""
    primary = next(iter(backbones.values()))
    digests = trained.root_digests
    doc = {
        "run_id": run_id,
        "created_at": utc_timestamp(),
        "config": config.model_dump(mode="json"),
        "seed": config.seed,
        "task": {"name": trained.task, "headline": trained.headline, "select_metric": trained.select_metric},
        "dataset": dataset_summary(dataset),
        "cache": {
            "key": primary.key,
            "key_fields": primary.key_fields,
            "path": trained.cache_source,
            "hit": cache_hit,
            "bytes_on_disk": trained.cache_bytes,
            "root_digest": digests.get(primary.name),
        },
        "backbones": {
            name: {
                "name_or_path": b.config.name_or_path,
                "cache_key": b.key,
                **({"root_digest": digests[name]} if digests.get(name) else {}),
            }
            for name, b in backbones.items()
        },
        "metrics": trained.metrics,
        **({"report": trained.report} if trained.report else {}),
        **({"warnings": trained.warnings} if trained.warnings else {}),
        "history": trained.history,
        "layer_weights": trained.layer_weights,
        # Two-cache tasks: the gallery side's UniPT weights beside the query side's.
        **({"gallery_layer_weights": trained.gallery_layer_weights} if trained.gallery_layer_weights else {}),
        "timings": timings,
        "versions": package_versions(),
        "project_commit": project_commit(),
        "runtime": trained.runtime,
        "registry": registry,
        **(extra or {}),
    }
    return finite_record(doc)


def dataset_summary(dataset: DatasetTable) -> dict[str, Any]:
    """What a run record says of its dataset: where it came from, its fingerprint, splits and classes."""
    return {
        "source": dataset.source,
        "fingerprint": dataset.fingerprint,
        "num_examples": len(dataset),
        "splits": dataset.split_counts(),
        "label_names": dataset.label_names,
        "class_counts": dataset.class_counts(),
        "split_scheme": dataset.split_scheme,
        "duplicates": dataset.duplicates,
    }


def write_run_record(runs_root: str | Path, record: dict[str, Any]) -> Path:
    """Write ``<runs_root>/<run_id>/record.json`` (atomically) and the resolved config as YAML."""
    run_dir = Path(runs_root) / check_run_id(record["run_id"])
    # The directory may exist already, holding the run's training checkpoint; never another record.
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / RECORD_FILE).exists():
        raise UniptError(
            f"run {record['run_id']} already has a {RECORD_FILE} in {run_dir}; not overwriting it"
        )
    (run_dir / "config.yaml").write_text(yaml.safe_dump(record["config"], sort_keys=False))
    tmp = run_dir / f".{RECORD_FILE}.tmp"
    tmp.write_text(json.dumps(finite_record(record), indent=2, sort_keys=True, default=str, allow_nan=False))
    os.replace(tmp, run_dir / RECORD_FILE)
    return run_dir


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / RECORD_FILE).read_text())


def iter_run_records(runs_root: str | Path) -> list[dict[str, Any]]:
    """Every run record under ``runs_root``, oldest first. A damaged record is an error, not a skip:
    whoever asks (e.g. garbage collection) must not act as if that run did not exist."""
    root = Path(runs_root).expanduser()
    if not root.is_dir():
        return []
    records = []
    for path in sorted(root.glob(f"*/{RECORD_FILE}")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UniptError(
                f"run record {path} is unreadable ({type(exc).__name__}); fix or remove it"
            ) from exc
    return records


def referenced_cache_keys(runs_root: str | Path) -> set[str]:
    """Cache keys that some run record points at: what `unipt cache gc` must keep."""
    keys = set()
    for record in iter_run_records(runs_root):
        keys.add(record.get("cache", {}).get("key"))
        # Multi-backbone runs (e.g. retrieval) use one cache per backbone.
        keys.update(b.get("cache_key") for b in record.get("backbones", {}).values())
    return {key for key in keys if key}


def cache_keys_of(record: dict[str, Any]) -> dict[str, str]:
    """Every cache a run record uses, by role: its training cache and each backbone's cache."""
    return _by_role(record, "key", "cache_key")


def cache_digests_of(record: dict[str, Any]) -> dict[str, str]:
    """The root digest of every cache a run record read, by the roles of :func:`cache_keys_of`."""
    return _by_role(record, "root_digest", "root_digest")


def _by_role(record: dict[str, Any], cache_field: str, backbone_field: str) -> dict[str, str]:
    """``record["cache"][cache_field]`` as role "cache", and each backbone's ``backbone_field`` as
    "backbone:<name>", where set."""
    found: dict[str, str] = {}
    if record.get("cache", {}).get(cache_field):
        found["cache"] = record["cache"][cache_field]
    for name, backbone in (record.get("backbones") or {}).items():
        if isinstance(backbone, dict) and backbone.get(backbone_field):
            found[f"backbone:{name}"] = backbone[backbone_field]
    return found
