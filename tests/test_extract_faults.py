"""Extraction that survives being killed, and two extractions of one key at once.

Each test runs `unipt extract` as a user would (a separate process starting its own local Ray) and
compares the finished store with an uninterrupted build through the per-file checksums.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_config
from unipt.pipeline import experiment
from unipt.pipeline.cache.admin import verify
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.config import load_config

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def slow_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real MiniLM with small shards and batches: 15 shards, each long enough to be killed during."""
    from tests.conftest import make_sentiment_rows, write_csv

    root = tmp_path_factory.mktemp("faults")
    data = write_csv(root / "data.csv", make_sentiment_rows(240))
    return write_config(
        root / "config.yaml",
        str(data),
        "bundled:all-minilm-l6-v2",
        root,
        backbone={"batch_size": 2, "max_length": 32},
        extract={"shard_size": 16, "workers": 1, "chunk_rows": 128},
    )


@pytest.fixture(scope="module")
def key(slow_config: Path) -> str:
    return experiment.prepare(load_config(slow_config)).key


def _segment(config: Path) -> tuple[str, str]:
    """(id, path under the cache root) of the one segment a fresh extraction of ``config`` builds: the
    Zarr store whose shards resume and whose bytes must not depend on the interruption."""
    from unipt.pipeline.cache.identity import space_key
    from unipt.pipeline.cache.space import segment_id
    from unipt.pipeline.data.table import input_hashes

    prep = experiment.prepare(load_config(config))
    space = space_key(prep.key_fields)
    segment = segment_id(space, list(dict.fromkeys(input_hashes(prep.dataset.table))))
    return segment, f"spaces/{space}/segments/{segment}"


def _extract(config: Path, cache_root: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "unipt.pipeline.cli",
            "extract",
            str(config),
            "--no-progress",
            "--cache-root",
            str(cache_root),
        ],
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),  # noqa: SIM115 - closed with the process
        text=True,
        start_new_session=True,  # its own process group: kill -9 takes the driver and the Ray it started
    )


@pytest.fixture(scope="module")
def reference(slow_config: Path, key: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Per-file checksums of an uninterrupted build."""
    root = tmp_path_factory.mktemp("reference")
    proc = _extract(slow_config, root / "cache", root / "log.txt")
    assert proc.wait(timeout=300) == 0, (root / "log.txt").read_text()
    return _checksums(root / "cache" / _segment(slow_config)[1])


def _checksums(store: Path) -> dict[str, str]:
    files = json.loads((store / "checksums.json").read_text())["files"]
    return {name: sha for name, sha in files.items() if name != "zarr.json"}  # the root holds the commit time


def _wait_for_markers(markers: Path, at_least: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = len(list(markers.glob("*.json"))) if markers.is_dir() else 0
        if done >= at_least:
            return done
        assert proc.poll() is None, "extraction ended before it could be interrupted"
        time.sleep(0.005)
    raise AssertionError(f"no {at_least} finished shards within {timeout}s")


def _ray_worker_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "ray::ExtractionWorker"], capture_output=True, text=True).stdout
    return {int(pid) for pid in out.split()}


def test_kill_9_of_the_driver_then_the_same_command_finishes_only_the_missing_shards(
    slow_config, key, reference, tmp_path
):
    cache = tmp_path / "cache"
    segment, store = _segment(slow_config)
    proc = _extract(slow_config, cache, tmp_path / "killed.txt")
    _wait_for_markers(cache / ".partial" / segment / "_shards", 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(1.0)  # let anything the kill missed show itself by writing
    done = len(list((cache / ".partial" / segment / "_shards").glob("*.json")))
    assert 2 <= done < 15 and not (cache / key).exists()  # interrupted, nothing published

    again = _extract(slow_config, cache, tmp_path / "resumed.txt")
    out, _ = again.communicate(timeout=300)
    log = (tmp_path / "resumed.txt").read_text()
    assert again.returncode == 0, log
    resumed = re.search(r"(\d+) of (\d+) shards resumed \(tokens and bytes: this run's\)", log)
    assert resumed and int(resumed.group(1)) in (done, done + 1), log
    assert _checksums(cache / store) == reference  # byte-identical to the uninterrupted build
    assert verify(open_cache(cache / key)) == []


def test_a_worker_killed_mid_run_is_restarted_and_its_shard_redone(slow_config, key, reference, tmp_path):
    cache = tmp_path / "cache"
    segment, store = _segment(slow_config)
    before = _ray_worker_pids()
    proc = _extract(slow_config, cache, tmp_path / "log.txt")
    _wait_for_markers(cache / ".partial" / segment / "_shards", 1, proc)
    workers = _ray_worker_pids() - before
    assert workers, "no extraction worker process found"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, (tmp_path / "log.txt").read_text()
    assert _checksums(cache / store) == reference
    assert verify(open_cache(cache / key)) == []


def test_two_concurrent_extractions_of_one_key_build_it_once(slow_config, key, reference, tmp_path):
    cache = tmp_path / "cache"
    segment, store = _segment(slow_config)
    first = _extract(slow_config, cache, tmp_path / "first.txt")
    second = _extract(slow_config, cache, tmp_path / "second.txt")
    assert first.wait(timeout=300) == 0 and second.wait(timeout=300) == 0
    logs = (tmp_path / "first.txt").read_text() + (tmp_path / "second.txt").read_text()
    assert logs.count("extracted 240 examples") == 1  # one built it ...
    assert "waiting for it" in logs or "cache hit" in logs  # ... the other waited for it and reused it
    assert _checksums(cache / store) == reference
    assert verify(open_cache(cache / key)) == []
    assert not (cache / ".partial" / segment).exists()
