"""`unipt cache gc --yes` running all the time cannot delete a cache between its extraction and training,
and lock files do not pile up in `.partial/` and `.leases/`.

The handover: extraction takes the cache's read lease before it lets go of the build lock (and a cache
hit takes it before it looks), and the run holds it until training is recorded.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import KEY, build_cache, run_cli, write_config
from unipt.pipeline.cache.admin import sweep_lock_files
from unipt.pipeline.cache.locks import ReadLease, exclusive, exclusive_if_free
from unipt.pipeline.cache.root import CacheRoot

pytestmark = pytest.mark.faults


def _lock_files(cache_root: Path) -> list[Path]:
    return sorted(cache_root.glob(".partial/*.lock")) + sorted(cache_root.glob(".leases/*.lock"))


GC_LOOP = textwrap.dedent(
    """
    import contextlib, io, sys, time
    from pathlib import Path
    from unipt.pipeline.cli.app import main

    cache_root, runs_root, registry, stop = sys.argv[1:5]
    rounds = removed = 0
    while not Path(stop).exists():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(["cache", "gc", "--yes", "--include-partial", "--cache-root", cache_root,
                  "--runs-root", runs_root, "--registry", registry, "--no-registry"])
        removed += out.getvalue().count("removing ")
        rounds += 1
        time.sleep(0.02)
    print(rounds, removed)
    """
)


def test_a_run_finishes_while_gc_yes_runs_in_a_loop(tmp_path, tiny_bert_dir, sentiment_csv):
    """With --include-partial too: the segment the extraction is building in `.partial/` is under the
    build lock gc checks (it used to check a lock nobody held, delete the segment, and the run died)."""
    config = write_config(
        tmp_path / "c.yaml",
        str(sentiment_csv),
        str(tiny_bert_dir),
        tmp_path,
        train={"epochs": 2, "batch_size": 16, "block_examples": 32, "probe_baseline": False},
    )
    cache_root, runs_root, registry = tmp_path / "cache", tmp_path / "runs", tmp_path / "registry.sqlite"
    stop = tmp_path / "stop"
    gc = subprocess.Popen(
        [sys.executable, "-c", GC_LOOP, str(cache_root), str(runs_root), str(registry), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3.0)  # gc is looping before the run starts
        assert gc.poll() is None, gc.stderr.read() if gc.stderr else ""
        first = run_cli("run", str(config), "--no-progress", check=False)
        # A second run is a cache hit: the hit takes its lease before it looks, so gc cannot slip in.
        second = run_cli("run", str(config), "--no-progress", check=False)
    finally:
        stop.touch()
        out, err = gc.communicate(timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "cache hit" in second.stderr
    assert gc.returncode == 0 and len(out.split()) == 2, err[-3000:]
    rounds, removed = (int(n) for n in out.split())
    assert gc.returncode == 0, err
    assert rounds >= 10, f"gc ran only {rounds} times during the runs"
    assert removed == 0  # nothing it was allowed to take
    assert len(CacheRoot(cache_root).keys()) == 1  # and the cache is kept (now referenced by the runs)
    assert _lock_files(cache_root) == []  # every lock file went with its holder


def test_lock_files_are_deleted_when_let_go(tmp_path):
    root = CacheRoot(tmp_path)
    build = root.lock_location(KEY)
    with exclusive(build):
        assert Path(build.url).exists()
    assert not Path(build.url).exists()

    lease = root.lease_location(KEY)
    first, second = ReadLease(lease), ReadLease(lease)
    assert first.held and second.held
    first.release()
    assert Path(lease.url).exists()  # another reader still holds it
    with exclusive_if_free(lease) as free:
        assert not free  # gc cannot take it from the reader
    second.release()
    assert not Path(lease.url).exists()  # the last reader took it along

    with exclusive_if_free(lease) as free:  # gc looking at an unused cache leaves no file behind
        assert free
    assert _lock_files(tmp_path) == []


def test_a_waiter_never_shares_a_lock_with_a_newcomer_after_the_file_is_deleted(tmp_path):
    """The holder deletes the file as it lets go; the process that was waiting on that (now deleted)
    file must notice and lock the file at the path, or it and a newcomer would both "hold" the lock."""
    lock = CacheRoot(tmp_path).lock_location(KEY)
    holders: list[str] = []
    overlaps: list[tuple[str, str]] = []
    entered = threading.Event()

    def build(name: str) -> None:
        with exclusive(lock):
            if holders:
                overlaps.append((holders[0], name))
            holders.append(name)
            entered.set()
            time.sleep(0.2)
            holders.remove(name)

    with exclusive(lock):
        waiter = threading.Thread(target=build, args=("waiter",))
        waiter.start()
        time.sleep(0.2)  # the waiter has opened the file and blocks on it
    newcomer = threading.Thread(target=build, args=("newcomer",))
    newcomer.start()
    waiter.join(10)
    newcomer.join(10)
    assert entered.is_set() and overlaps == []
    assert _lock_files(tmp_path) == []


def test_gc_sweeps_lock_files_left_by_killed_processes_and_keeps_held_ones(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, [3, 4, 5], {0: 4})
    other = "cd" * 16
    for stale in (root.lock_location(other), root.lease_location(other), root.lock_location(KEY)):
        Path(stale.url).parent.mkdir(parents=True, exist_ok=True)
        Path(stale.url).touch()  # what a kill -9 leaves
    reader = ReadLease(root.lease_location(KEY))  # a training run reading the cache
    try:
        assert sweep_lock_files(root) == 3
        assert _lock_files(tmp_path) == [Path(root.lease_location(KEY).url)]
    finally:
        reader.release()
    assert _lock_files(tmp_path) == []


def test_gc_yes_on_the_command_line_sweeps_stale_lock_files(tmp_path):
    root = CacheRoot(tmp_path / "cache")
    stale = root.lease_location("ef" * 16)
    Path(stale.url).parent.mkdir(parents=True, exist_ok=True)
    Path(stale.url).touch()
    run_cli(
        "cache", "gc", "--yes", "--cache-root", str(tmp_path / "cache"),
        "--runs-root", str(tmp_path / "runs"), "--registry", str(tmp_path / "registry.sqlite"),
        "--no-registry",
    )  # fmt: skip
    assert _lock_files(tmp_path / "cache") == []


def test_gc_include_partial_keeps_a_segment_under_its_build_lock(tmp_path, capsys):
    """What an incremental extraction (extract/runner.py) and a compaction hold while a segment is in
    `.partial/`: the space's lock, the segment's read lease and the segment's build lock."""
    from tests.test_incremental import SPACE
    from unipt.pipeline.cli.app import main

    root = CacheRoot(tmp_path)
    segment = "5e" * 16
    build_cache(root, [3, 4, 5], {0: 4}, key=segment, commit=False)  # a partial store under .partial/
    args = ["cache", "gc", "--yes", "--include-partial", "--cache-root", str(tmp_path), "--no-registry"]
    with exclusive(root.lock_location(SPACE)), ReadLease(root.lease_location(segment)):
        with exclusive(root.lock_location(segment)):
            assert main(args) == 0
            out = capsys.readouterr().out
            assert f"skipping {segment} (unfinished): an extraction is building it" in out
            assert root.partial_keys() == [segment]
        assert main(args) == 0  # the build finished or died: its lock is free, the store is garbage
    assert f"removing {segment} (unfinished)" in capsys.readouterr().out and root.partial_keys() == []


def test_sizing_a_store_tolerates_files_vanishing_while_it_walks(tmp_path):
    """gc sizes stores other processes are committing, compacting or collecting: a file or folder that
    goes away mid-walk is left out (it used to be a FileNotFoundError that ended `gc` with a traceback)."""
    from unipt.pipeline.storage import Location

    store = tmp_path / "store"
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            folder = store / f"c{n % 7}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(20):
                (folder / str(i)).write_bytes(b"x" * 10)
            for child in folder.iterdir():
                child.unlink()
            folder.rmdir()
            n += 1

    store.mkdir()
    (store / "kept").write_bytes(b"y" * 100)
    (store / "link").symlink_to(store / "kept")  # a link is not counted: sizes never follow one
    worker = threading.Thread(target=churn)
    worker.start()
    try:
        sizes = [Location(str(store)).size() for _ in range(300)]
    finally:
        stop.set()
        worker.join()
    assert min(sizes) >= 100 and all((size - 100) % 10 == 0 for size in sizes)
    assert Location(str(store)).size() == 100
