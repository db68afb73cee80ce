"""The run registry: every run, its config, caches, metrics and lineage in one SQLite database.

Run records (``<runs_root>/<run_id>/record.json``) stay the per-run source of truth; the registry
indexes them so runs can be listed, compared and redone (``unipt runs``, ``unipt rerun``,
``unipt sweep``) and so ``unipt cache gc`` knows which caches are still in use.

The database is opened in WAL mode with a busy timeout: parallel runs (a sweep's trials, or several
``unipt run`` processes) register concurrently without "database is locked" errors. The schema
carries a version (``PRAGMA user_version``); a database written by a newer unipt is refused rather
than misread. Runs get in from their folders through :mod:`unipt.pipeline.runs.registration`.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unipt.pipeline.errors import UniptError
from unipt.pipeline.hashing import sha256_json
from unipt.pipeline.log import human_bytes, utc_timestamp
from unipt.pipeline.runs.records import cache_digests_of, cache_keys_of
from unipt.pipeline.storage import (
    DEFAULT_REGISTRY as DEFAULT_REGISTRY,  # re-exported: where commands look
)

SCHEMA_VERSION = 2  # 2: run_caches.root_digest (the root digest of each cache a run read)
BUSY_TIMEOUT_S = 60.0
# Less free space than this beside the registry and a run's registration (a row, its WAL pages) may not
# fit: refused before the work, not after it.
MIN_FREE_BYTES = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    name TEXT,
    created_at TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    seed INTEGER,
    config_json TEXT NOT NULL,
    config_sha256 TEXT NOT NULL,
    dataset_source TEXT,
    dataset_fingerprint TEXT,
    cache_key TEXT,
    cache_key_fields_json TEXT NOT NULL,
    metrics_json TEXT NOT NULL,
    versions_json TEXT NOT NULL,
    artifacts_json TEXT NOT NULL,
    runtime_json TEXT NOT NULL,
    project_commit TEXT,
    rerun_of TEXT,
    parent_run_id TEXT,
    sweep_id TEXT,
    sweep_params_json TEXT
);
CREATE TABLE IF NOT EXISTS run_caches (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    cache_key TEXT NOT NULL,
    role TEXT NOT NULL,
    root_digest TEXT,
    PRIMARY KEY (run_id, cache_key, role)
);
CREATE INDEX IF NOT EXISTS run_caches_by_key ON run_caches(cache_key);
CREATE INDEX IF NOT EXISTS runs_by_sweep ON runs(sweep_id);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs(created_at);
"""
# A sweep's spec as it started, and its digest: `unipt sweep --resume` trusts this copy, never the sweep's
# folder under the runs root (anyone who can write there could change what the sweep runs). Created on
# first use, so registries written before it stay schema version 1 and readable by older unipt.
_SWEEPS = """
CREATE TABLE IF NOT EXISTS sweeps (
    sweep_id TEXT PRIMARY KEY,
    spec_json TEXT NOT NULL,
    spec_sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class RunEntry:
    """One registered run, as stored."""

    run_id: str
    name: str | None
    created_at: str
    registered_at: str
    seed: int | None
    config: dict[str, Any]
    dataset_source: str | None
    dataset_fingerprint: str | None
    cache_key: str | None
    cache_key_fields: dict[
        str, Any
    ]  # what the training cache's key hashes (see unipt.pipeline.cache.identity)
    cache_keys: dict[str, str]  # role ("main", or a backbone's name) -> cache key
    metrics: dict[str, Any]
    versions: dict[str, Any]
    artifacts: dict[str, Any]
    runtime: dict[str, Any]
    project_commit: str | None
    rerun_of: str | None
    parent_run_id: str | None
    sweep_id: str | None
    sweep_params: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class Registry:
    """A run registry at ``path`` (created with its parent folder on first use)."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists() and not create:
            raise UniptError(f"no run registry at {self.path}; run an experiment first or pass --registry")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UniptError(
                f"run registry {self.path} cannot be created: its folder {self.path.parent} cannot be made "
                f"({exc.strerror or exc}); create it (mkdir -p {self.path.parent}) or pass another --registry"
            ) from exc
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), so a writer takes the
            # write lock up front and waits on busy_timeout instead of failing at commit time.
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._use_wal()
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            what, fix = failure(self.path, exc)
            raise UniptError(f"{what}; {fix}") from exc

    def check_writable(self) -> None:
        """Take the write lock and give it back, writing nothing: a registry that is read-only, damaged
        or held by another process fails here, before the work whose run it would record."""
        try:
            with self._write() as db:
                # A write statement that matches no row: SQLite still checks the file can be written.
                db.execute("DELETE FROM runs WHERE 0")
                raise _Probed
        except _Probed:
            pass
        except sqlite3.DatabaseError as exc:
            what, fix = failure(self.path, exc)
            raise UniptError(f"{what}; nothing was run: {fix}, then run the same command again") from exc
        free = shutil.disk_usage(self.path.parent).free
        if free < MIN_FREE_BYTES:
            raise UniptError(
                f"the disk holding run registry {self.path} has {human_bytes(free)} free, too little to "
                f"register a run; nothing was run: free space there (`df -h {self.path.parent}` shows it) or "
                "pass another --registry, then run the same command again"
            )

    def _use_wal(self) -> None:
        # Switching a new database to WAL needs an exclusive lock, and SQLite answers "database is
        # locked" at once (without its busy handler) while another process opens or switches the same
        # file, so the switch is retried for as long as an ordinary write would wait.
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self._db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UniptError(
                f"run registry {self.path} has schema version {version}, newer than this unipt's "
                f"({SCHEMA_VERSION}); upgrade unipt-cache or use another --registry"
            )
        if version == SCHEMA_VERSION:
            return
        with self._write() as db:
            current = db.execute("PRAGMA user_version").fetchone()[0]  # another process may have won
            if current == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
            elif current == 1:  # runs registered before root digests: theirs stay NULL (not checked)
                db.execute("ALTER TABLE run_caches ADD COLUMN root_digest TEXT")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def register(
        self, record: dict[str, Any], artifacts: dict[str, Any] | None = None, exist_ok: bool = False
    ) -> bool:
        """Add a run from its record (the dict written to record.json); False if ``exist_ok`` and it was
        in the registry already (registered from its record.json by another command)."""
        config = record.get("config", {})
        dataset = record.get("dataset", {})
        sweep = record.get("sweep") or {}
        row = {
            "run_id": record["run_id"],
            "name": config.get("name"),
            "created_at": record.get("created_at") or utc_timestamp(),
            "registered_at": utc_timestamp(),
            "seed": record.get("seed"),
            "config_json": _dumps(config),
            "config_sha256": sha256_json(config),
            "dataset_source": dataset.get("source"),
            "dataset_fingerprint": dataset.get("fingerprint"),
            "cache_key": record.get("cache", {}).get("key"),
            "cache_key_fields_json": _dumps(record.get("cache", {}).get("key_fields", {})),
            "metrics_json": _dumps(record.get("metrics", {})),
            "versions_json": _dumps(record.get("versions", {})),
            "artifacts_json": _dumps(artifacts or {}),
            "runtime_json": _dumps(record.get("runtime", {})),
            "project_commit": record.get("project_commit"),
            "rerun_of": record.get("rerun_of"),
            "parent_run_id": record.get("parent_run_id"),
            "sweep_id": sweep.get("id"),
            "sweep_params_json": _dumps(sweep["params"]) if "params" in sweep else None,
        }
        columns = ", ".join(row)
        marks = ", ".join(f":{name}" for name in row)
        try:
            with self._write() as db:
                db.execute(f"INSERT INTO runs ({columns}) VALUES ({marks})", row)
                digests, keys = cache_digests_of(record), cache_keys_of(record)
                db.executemany(
                    "INSERT INTO run_caches (run_id, cache_key, role, root_digest) VALUES (?, ?, ?, ?)",
                    [(row["run_id"], key, role, digests.get(role)) for role, key in keys.items()],
                )
        except sqlite3.IntegrityError as exc:
            if exist_ok:
                return False
            raise UniptError(f"run {row['run_id']} is already in the registry {self.path}") from exc
        except sqlite3.DatabaseError as exc:
            what, fix = failure(self.path, exc)
            run_dir = (artifacts or {}).get("run_dir") or "RUN_DIR"
            raise UniptError(
                f"run {row['run_id']} finished but could not be registered: {what}; its record is kept in "
                f"{run_dir}: {fix}, then run `unipt runs register {run_dir} --registry {self.path}` "
                "(the next `unipt run` or `unipt train` with this registry also registers it)"
            ) from exc
        return True

    def set_artifacts(self, run_id: str, artifacts: dict[str, Any]) -> None:
        """Replace a registered run's artifacts (its own registration knows files a recovery missed)."""
        with self._write() as db:
            db.execute("UPDATE runs SET artifacts_json = ? WHERE run_id = ?", (_dumps(artifacts), run_id))

    def run_ids(self) -> set[str]:
        """Every registered run id."""
        return {row[0] for row in self._db.execute("SELECT run_id FROM runs")}

    def get(self, run_id: str) -> RunEntry:
        """A run by its id or a unique prefix of it."""
        rows = self._db.execute(
            "SELECT * FROM runs WHERE run_id = ? OR run_id LIKE ? ESCAPE '\\' ORDER BY run_id",
            (run_id, _like_prefix(run_id)),
        ).fetchall()
        exact = [r for r in rows if r[0] == run_id]
        rows = exact or rows
        if not rows:
            raise UniptError(f"no run {run_id!r} in the registry {self.path}; `unipt runs ls` lists the runs")
        if len(rows) > 1:
            ids = ", ".join(r[0] for r in rows[:5])
            raise UniptError(f"run id {run_id!r} is ambiguous ({ids}, ...); give more of it")
        return self._entry(rows[0])

    def list(self, sweep_id: str | None = None, limit: int | None = None) -> list[RunEntry]:
        """Runs in registration order (the last ``limit`` of them), optionally one sweep's only."""
        query, params = "SELECT * FROM runs", []
        if sweep_id is not None:
            query += " WHERE sweep_id = ?"
            params.append(sweep_id)
        query += " ORDER BY rowid DESC"  # registration order
        if limit is not None:
            query += " LIMIT ?"
            params.append(limit)
        return [self._entry(row) for row in reversed(self._db.execute(query, params).fetchall())]

    def record_sweep(self, sweep_id: str, spec: dict[str, Any]) -> str:
        """Keep a new sweep's spec (what it runs) and its sha256, which ``--resume`` checks; returns it."""
        digest = sha256_json(spec)
        with self._write() as db:
            db.execute(_SWEEPS)
            db.execute(
                "INSERT INTO sweeps (sweep_id, spec_json, spec_sha256, created_at) VALUES (?, ?, ?, ?)",
                (sweep_id, _dumps(spec), digest, utc_timestamp()),
            )
        return digest

    def sweep_spec(self, sweep_id: str) -> tuple[dict[str, Any], str] | None:
        """(spec, sha256) recorded when ``sweep_id`` started; None if this registry never saw it start."""
        table = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sweeps'")
        if table.fetchone() is None:
            return None
        row = self._db.execute(
            "SELECT spec_json, spec_sha256 FROM sweeps WHERE sweep_id = ?", (sweep_id,)
        ).fetchone()
        return None if row is None else (json.loads(row[0]), row[1])

    def cache_keys(self) -> set[str]:
        """Every cache key some registered run uses."""
        return {row[0] for row in self._db.execute("SELECT DISTINCT cache_key FROM run_caches")}

    def cache_digests(self, key: str) -> dict[str, list[str]]:
        """The root digests registered runs recorded for cache ``key``: digest -> the runs that read it."""
        found: dict[str, list[str]] = {}
        for digest, run_id in self._db.execute(
            "SELECT DISTINCT root_digest, run_id FROM run_caches "
            "WHERE cache_key = ? AND root_digest IS NOT NULL ORDER BY run_id",
            (key,),
        ):
            found.setdefault(digest, []).append(run_id)
        return found

    def replace_cache_digest(self, key: str, old: str, new: str) -> int:
        """Cache ``key`` was rewritten with the same content (compaction): the runs that read it as ``old``
        now name ``new``. Runs that recorded another digest keep it, so damage is not laundered."""
        with self._write() as db:
            moved = db.execute(
                "UPDATE run_caches SET root_digest = ? WHERE cache_key = ? AND root_digest = ?",
                (new, key, old),
            )
            return moved.rowcount

    def _entry(self, row: tuple) -> RunEntry:
        names = [d[0] for d in self._db.execute("SELECT * FROM runs LIMIT 0").description]
        data = dict(zip(names, row, strict=True))
        cache_keys = dict(
            self._db.execute(
                "SELECT role, cache_key FROM run_caches WHERE run_id = ? ORDER BY role", (data["run_id"],)
            ).fetchall()
        )
        return RunEntry(
            run_id=data["run_id"],
            name=data["name"],
            created_at=data["created_at"],
            registered_at=data["registered_at"],
            seed=data["seed"],
            config=json.loads(data["config_json"]),
            dataset_source=data["dataset_source"],
            dataset_fingerprint=data["dataset_fingerprint"],
            cache_key=data["cache_key"],
            cache_key_fields=json.loads(data["cache_key_fields_json"]),
            cache_keys=cache_keys,
            metrics=json.loads(data["metrics_json"]),
            versions=json.loads(data["versions_json"]),
            artifacts=json.loads(data["artifacts_json"]),
            runtime=json.loads(data["runtime_json"]),
            project_commit=data["project_commit"],
            rerun_of=data["rerun_of"],
            parent_run_id=data["parent_run_id"],
            sweep_id=data["sweep_id"],
            sweep_params=json.loads(data["sweep_params_json"]) if data["sweep_params_json"] else None,
        )


class _Probed(Exception):
    """Ends :meth:`Registry.check_writable`'s transaction by rolling it back."""


def failure(path: Path, exc: sqlite3.DatabaseError) -> tuple[str, str]:
    """(what is wrong, what to do) for an SQLite error on the registry at ``path``: a locked, read-only,
    full or damaged registry each get their own fix, never only SQLite's words."""
    text = str(exc)
    lowered = text.lower()
    if "locked" in lowered or "busy" in lowered:
        return (
            f"run registry {path} stayed locked by another process for {BUSY_TIMEOUT_S:.0f}s ({text})",
            "wait for the other unipt command (a sweep, a run registering) to finish, or pass another "
            "--registry",
        )
    if "readonly" in lowered or "read-only" in lowered:
        return (
            f"run registry {path} is read-only ({text})",
            f"make it and its folder writable (chmod u+w {path} {path.parent}) or pass another --registry",
        )
    if "full" in lowered or "disk i/o" in lowered:
        return (
            f"run registry {path} cannot be written ({text}): the disk holding it is full or failing",
            f"free space there (`df -h {path.parent}` shows how much is left) or pass another --registry",
        )
    if "not a database" in lowered or "malformed" in lowered or "encrypted" in lowered:
        return (
            f"run registry {path} is damaged ({text})",
            f"move it aside (mv {path} {path}.damaged): the next `unipt run` or `unipt train` starts a new "
            "one and registers the runs of its runs root again from their record.json; or pass another "
            "--registry",
        )
    return (
        f"run registry {path} cannot be opened ({text})",
        "check the path (its folder must exist and be writable) or pass another --registry",
    )


def registered_cache_keys(path: str | Path) -> set[str]:
    """Cache keys the registry at ``path`` references; none if there is no registry there yet."""
    if not Path(path).expanduser().exists():
        return set()
    with Registry(path, create=False) as registry:
        return registry.cache_keys()


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
