"""Extraction on a multi-node Ray cluster on this machine: losing a node mid-run, and a worker count the
cluster cannot place.

The cluster (ray.cluster_utils.Cluster: one head and one worker node, 1 CPU each) runs in this test
process; `unipt extract` joins it from its own process with --ray-address, as a user would. Ray writes
the address of the latest cluster into its temp dir, where a plain ``ray.init()`` elsewhere on the
machine would find and join it: RAY_TMPDIR points at a private folder so that never happens.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_sentiment_rows, write_config, write_csv

pytestmark = pytest.mark.faults


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A one-node cluster (head, 1 CPU); tests add nodes. Node death is noticed within about a second."""
    from ray.cluster_utils import Cluster

    private = tempfile.mkdtemp(prefix="uc", dir="/tmp")  # short: Ray's socket paths live under it
    monkeypatch.setenv("RAY_TMPDIR", private)
    head = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 200, "health_check_failure_threshold": 3},
        },
    )
    try:
        yield head
    finally:
        head.shutdown()
        shutil.rmtree(private, ignore_errors=True)


@pytest.fixture
def config(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    """Tiny BERT, 640 shards of 4 texts, 2 workers: enough shards left when the first one is done.

    Enough that the run outlasts removing a node (seconds): with 40 shards of 8 a quiet machine finished
    them all before the node was gone, and nothing was lost to re-queue."""
    data = write_csv(tmp_path / "data.csv", make_sentiment_rows(2560))
    return write_config(
        tmp_path / "config.yaml",
        str(data),
        str(tiny_bert_dir),
        tmp_path,
        backbone={"batch_size": 4, "max_length": 32},
        extract={"shard_size": 4, "chunk_rows": 64, "workers": 2},
    )


def _extract(config: Path, cache_root: Path, address: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "unipt.pipeline.cli", "extract", str(config), "--no-progress"]
        + ["--cache-root", str(cache_root), "--ray-address", address],
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),  # noqa: SIM115 - closed with the process
        text=True,
    )


# Files that differ between any two builds: the group metadata holds the commit time and the worker
# count, and the checksum manifest seals it (its other entries are compared one by one).
PER_BUILD = {"zarr.json", "checksums.json"}


def _store_bytes(store: Path) -> dict[str, str]:
    """sha256 of every data file of a committed store (arrays, offsets, the examples table)."""
    return {
        str(path.relative_to(store)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(store.rglob("*"))
        if path.is_file() and str(path.relative_to(store)) not in PER_BUILD
    }


def _recorded_checksums(store: Path) -> dict[str, str]:
    files = json.loads((store / "checksums.json").read_text())["files"]
    return {name: digest for name, digest in files.items() if name not in PER_BUILD}


def _worker_running_a_shard(node: object) -> bool:
    """Whether a worker process of ``node`` (a child of its raylet) is running ``run_shard`` now: Ray
    names a worker process after the task it runs (``ray::ExtractionWorker.run_shard``)."""
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit():
                continue
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])  # after "(comm)"
            if parent != raylet:
                continue
            if b"ExtractionWorker.run_shard" in (proc / "cmdline").read_bytes():
                return True
        except (OSError, IndexError, ValueError):
            continue  # a process that ended while we looked
    return False


def _only_cache(root: Path) -> Path:
    """The one segment the extraction wrote (its view, beside it, holds no activations)."""
    stores = list(root.glob("spaces/*/segments/*"))
    assert len(stores) == 1, stores
    return stores[0]


def test_losing_a_node_mid_run_requeues_its_shards_and_the_cache_is_byte_identical(cluster, config, tmp_path):
    address = cluster.address
    # Reference: the head alone. extract.workers=2 does not fit on 1 CPU, so it shrinks to 1, saying so.
    reference = tmp_path / "reference"
    proc = _extract(config, reference, address, tmp_path / "reference.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()
    log = (tmp_path / "reference.log").read_text()
    assert "extract.workers=2 asks for 2 workers of 1 CPU each; the Ray cluster can place 1 now" in log

    # Two nodes, two workers; the worker node is removed while its worker runs a shard (each worker has
    # two in flight), so those shards are lost and re-queued. Waiting for the first finished shard alone
    # was not enough: on a loaded machine the head's worker could finish one before the new node's worker
    # had loaded the backbone, and a worker lost while loading leaves no shard to re-queue. Now and then
    # the node's worker still finishes its last shard before Ray has the node down (nothing lost): then
    # the run is made again on a fresh node, up to 3 times.
    for attempt in range(3):
        node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        cache = tmp_path / f"cache-{attempt}"
        proc = _extract(config, cache, address, tmp_path / "log.txt")
        deadline = time.monotonic() + 240
        while not _worker_running_a_shard(node):
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()
            assert time.monotonic() < deadline, "the new node's worker ran no shard within 240s"
            time.sleep(0.005)
        cluster.remove_node(node, allow_graceful=False)
        assert proc.wait(timeout=300) == 0, (tmp_path / "log.txt").read_text()
        log = (tmp_path / "log.txt").read_text()
        print(log)
        if "lost 1 of 2 workers" in log:
            break
    assert "lost 1 of 2 workers; their shards were re-queued" in log
    assert "extracted 2560 examples" in log

    store = _only_cache(cache)
    assert store.name == _only_cache(reference).name
    assert _store_bytes(store) == _store_bytes(_only_cache(reference))  # byte-identical
    assert _recorded_checksums(store) == _recorded_checksums(_only_cache(reference))
    assert len(_recorded_checksums(store)) > 40  # every layer's chunks, not an empty comparison
    assert not list((cache / ".partial").glob("*.lock"))  # no stale build lock either


def test_more_workers_than_the_machine_can_place_shrink_instead_of_hanging(tiny_config, tmp_path):
    """A local Ray has os.cpu_count() CPUs: 99 one-CPU workers do not fit, the ones that do run.

    The 240 examples make one shard, so one worker does all the work: the summary says how many of the
    workers started ran a shard, and a line says the others ran none, rather than claiming them all."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "unipt.pipeline.cli", "extract", str(tiny_config), "--no-progress"]
        + ["--set", "extract.workers=99", "--set", "extract.shard_size=256"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    placed = re.search(r"the Ray cluster can place (\d+) now", result.stderr)
    assert placed, result.stderr
    assert "extract.workers=99 asks for 99 workers of 1 CPU each" in result.stderr
    workers = int(placed.group(1))
    assert "extracted 240 examples" in result.stderr
    if workers > 1:
        assert f"on 1 of {workers} worker(s)" in result.stderr
        assert f"{workers - 1} of {workers} workers ran no shard" in result.stderr
    else:
        assert "on 1 worker(s)" in result.stderr and "ran no shard" not in result.stderr
    print(f"finished in {time.monotonic() - started:.0f}s")


def test_losing_the_head_mid_run_is_one_line_naming_the_command_that_resumes(cluster, config, tmp_path):
    """The head's processes killed while a shard runs: Ray alone waits 60 s, then exits 1 in its words."""
    address, cache, log = cluster.address, tmp_path / "cache", tmp_path / "log.txt"
    proc = _extract(config, cache, address, log)
    deadline = time.monotonic() + 240
    while not _worker_running_a_shard(cluster.head_node):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the head's worker ran no shard within 240s"
        time.sleep(0.05)
    cluster.head_node.kill_all_processes(check_alive=False, allow_graceful=False)
    killed_at = time.monotonic()
    try:
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    took = time.monotonic() - killed_at
    stderr = log.read_text()
    print(stderr)
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("unipt: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert errors[0].startswith(f"unipt: error: lost the Ray head at {address}"), errors[0]
    command = f"unipt extract {config} --no-progress --cache-root {cache} --ray-address {address}"
    assert f"run `{command}` to resume from them" in errors[0]
    assert f"finished shards are kept under {cache / '.partial'}" in errors[0]
    assert took < 60, f"{took:.0f}s"
