"""Faults: a full disk while writing, training killed mid-epoch, and `unipt cache gc` while training reads.

A killed extraction worker and two extractions of one key at once are in tests/test_extract_faults.py
(a real kill -9 of the driver and of Ray's worker processes); resuming training at an epoch boundary is
in tests/test_train_checkpoints.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from zarr.abc.store import Store
from zarr.core.buffer import Buffer
from zarr.storage import WrapperStore

from tests.conftest import KEY, build_cache, example_table, make_sentiment_rows, write_config, write_csv
from unipt.pipeline.cache.admin import verify
from unipt.pipeline.cache.layout import SHARD_MARKERS, LayerSpec, StoreLayout
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cache.writer import CacheBuilder, write_shard
from unipt.pipeline.cli.app import main
from unipt.pipeline.config import TrainConfig
from unipt.pipeline.errors import UniptError
from unipt.pipeline.storage import Location
from unipt.train.checkpoint import CHECKPOINT_FILE
from unipt.train.tasks import train_task

pytestmark = pytest.mark.faults

# --- disk full -----------------------------------------------------------------------------------------


class _Disk:
    """A byte budget shared by every store opened while it is installed; None = unlimited."""

    def __init__(self) -> None:
        self.free: int | None = None


class DiskFullStore(WrapperStore):
    """The real local store, failing like a full disk (ENOSPC) once the budget is spent."""

    def __init__(self, store: Store, disk: _Disk) -> None:
        super().__init__(store)
        self.disk = disk

    def _with_store(self, store: Store) -> DiskFullStore:
        return type(self)(store, self.disk)

    async def set(self, key: str, value: Buffer) -> None:
        if self.disk.free is not None:
            if len(value) > self.disk.free:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
            self.disk.free -= len(value)
        await self._store.set(key, value)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> _Disk:
    disk = _Disk()
    real = Location.zarr_store
    monkeypatch.setattr(
        Location, "zarr_store", lambda self, read_only=False: DiskFullStore(real(self, read_only), disk)
    )
    return disk


def test_disk_full_while_writing_a_shard_commits_nothing_and_a_rerun_finishes(tmp_path, disk):
    root = CacheRoot(tmp_path)
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(3, 9, size=12)]
    layout = StoreLayout(
        layers=(LayerSpec(0, 16), LayerSpec(2, 16)),
        num_examples=12,
        max_length=8,
        shard_size=3,
        chunk_rows=8,
        codec="none",  # 256-byte chunks: the budget below lands inside the second shard
    )
    tokens = {layer: rng.standard_normal((sum(lengths), 16)).astype(np.float16) for layer in (0, 2)}
    starts = np.concatenate([[0], np.cumsum(lengths)])

    def shard_rows(shard) -> dict[int, np.ndarray]:
        lo, hi = starts[shard.example_start], starts[shard.example_stop]
        return {layer: t[lo:hi] for layer, t in tokens.items()}

    builder = CacheBuilder(root, KEY)
    builder.create(layout, {"label_names": ["a", "b"], "key_fields": {"dataset_fingerprint": "f"}})
    disk.free = 2200  # one shard's chunks (6 x 256 bytes) and part of the next
    shards = layout.shards()
    written = []
    with pytest.raises(UniptError) as info:
        for shard in shards:
            write_shard(
                builder.location,
                layout,
                shard,
                shard_rows(shard),
                lengths[shard.example_start : shard.example_stop],
            )
            written.append(shard.shard_id)
    message = str(info.value)
    assert "\n" not in message and "disk full while writing shard" in message
    assert "No space left on device" in message and "free space" in message and "rerun" in message
    failed = len(written)
    assert 0 < failed < len(shards)
    assert sorted(builder.finished_shards()) == written  # the failed shard has no marker
    assert not (tmp_path / ".partial" / KEY / SHARD_MARKERS / f"{failed:06d}.json").exists()
    assert not list((tmp_path / ".partial" / KEY).rglob("*.tmp"))  # no torn files left behind
    assert not root.has(KEY) and root.keys() == []  # nothing visible under the key
    with pytest.raises(UniptError, match="incomplete"):
        open_cache(root.partial_location(KEY))
    with pytest.raises(UniptError, match="are not written yet"):
        builder.commit(layout, example_table(12), {})

    # Space for the shards but not for the commit: still nothing visible, still one clear line.
    disk.free = None
    for shard in shards:
        if shard.shard_id not in builder.finished_shards():
            write_shard(
                builder.location,
                layout,
                shard,
                shard_rows(shard),
                lengths[shard.example_start : shard.example_stop],
            )
    disk.free = 100
    with pytest.raises(UniptError, match=f"disk full while writing cache {KEY}"):
        builder.commit(layout, example_table(12), {})
    assert not root.has(KEY)

    disk.free = None  # space freed: the same commit now goes through
    builder.commit(layout, example_table(12), {})
    reader = open_cache(root.location(KEY))
    assert verify(reader) == []
    for i in range(12):
        np.testing.assert_array_equal(reader.read_example(i, 2), tokens[2][starts[i] : starts[i + 1]])


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return result.returncode == 0


def test_disk_full_on_a_real_small_filesystem_during_extraction(ray_session, tmp_path, tiny_bert_dir, capsys):
    """The whole CLI against a 192 KiB tmpfs (needs root to mount; the injected test above runs anywhere)."""
    fs = tmp_path / "small-disk"
    if not _mount_tmpfs(fs, "192k"):
        pytest.skip("cannot mount a tmpfs here (needs root); test_disk_full_while_writing_a_shard covers it")
    try:
        data = write_csv(tmp_path / "data.csv", make_sentiment_rows(240))
        config = write_config(
            tmp_path / "c.yaml",
            str(data),
            str(tiny_bert_dir),
            tmp_path,
            extract={"shard_size": 32, "chunk_rows": 128, "codec": "none", "workers": 1},
            storage={"cache_root": str(fs / "cache")},
        )
        # --force: past the up-front free-space check (unipt plan), so the disk really fills mid-write.
        assert main(["extract", str(config), "--no-progress", "--force"]) == 2
        _, err = capsys.readouterr()
        errors = [line for line in err.splitlines() if line.startswith("unipt: error:")]
        assert len(errors) == 1, err
        assert "disk full while writing shard" in errors[0] and "No space left on device" in errors[0]
        assert "free space" in errors[0] and "the same command resumes" in errors[0]
        root = CacheRoot(fs / "cache")
        assert root.keys() == []  # not committed
        (key,) = root.partial_keys()
        done = len(list((fs / "cache" / ".partial" / key / SHARD_MARKERS).glob("*.json")))
        assert done < 8

        subprocess.run(["mount", "-o", "remount,size=64m", str(fs)], check=True)  # "free space"
        assert main(["extract", str(config), "--no-progress", "--force"]) == 0
        _, err = capsys.readouterr()
        assert f", {done} of " in err and "shards resumed" in err or done == 0
        # The partial store was the space's new segment; committed, a view of this dataset names it.
        (view,) = root.keys()
        assert root.partial_keys() == [] and verify(open_cache(root.location(view))) == []
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


# --- training killed mid-epoch, then resumed -----------------------------------------------------------

LENGTHS = [4, 6, 3, 5, 7, 2, 6, 5, 4, 3, 6, 5, 4, 5, 3, 6]
SPLITS = ["train"] * 10 + ["val"] * 3 + ["test"] * 3
CONFIG = TrainConfig(epochs=3, batch_size=2, block_examples=3, embed_size=8, dropout=0.2)

# Trains with per-epoch checkpoints and kills itself (SIGKILL: no cleanup, no exception handling) after
# two batches of the second epoch, i.e. in the middle of it.
KILLED_RUN = textwrap.dedent(
    """
    import os, pathlib, signal, sys
    import torch
    from unipt.pipeline.cache.opener import open_cache
    from unipt.pipeline.config import TrainConfig
    from unipt.train import loader
    from unipt.train.tasks import train_task

    torch.set_num_threads(1)
    real_epoch = loader.CacheBatches.epoch

    def epoch(self, n=0):
        for i, batch in enumerate(real_epoch(self, n)):
            if self.shuffle and n == 1 and i == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    loader.CacheBatches.epoch = epoch
    config = TrainConfig.model_validate_json(sys.argv[3])
    checkpoint = pathlib.Path(sys.argv[2])
    train_task(open_cache(sys.argv[1]), config, 3, progress=False, checkpoint=checkpoint)
    """
)


def _without_timing(result) -> tuple[dict, list[dict]]:
    metrics = {k: v for k, v in result.metrics.items() if "seconds" not in k}
    return metrics, [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in result.history]


def test_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    import torch

    root = CacheRoot(tmp_path / "cache")
    build_cache(root, LENGTHS, {0: 8, 1: 8, 2: 8}, shard_size=5, splits=SPLITS)
    store = str(root.location(KEY))
    checkpoint = tmp_path / "run" / CHECKPOINT_FILE
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, store, str(checkpoint), CONFIG.model_dump_json()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1  # epoch 2 was lost with the process

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed process: CPU sums depend on the thread count
    try:
        reader = open_cache(store)
        resumed = train_task(reader, CONFIG, 3, progress=False, checkpoint=checkpoint, resume=checkpoint)
        uninterrupted = train_task(reader, CONFIG, 3, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert _without_timing(resumed) == _without_timing(uninterrupted)
    assert resumed.layer_weights == uninterrupted.layer_weights


# --- gc while a training run reads ---------------------------------------------------------------------


def _gc(capsys: pytest.CaptureFixture, root: Path) -> str:
    args = ["cache", "gc", "--yes", "--cache-root", str(root / "cache"), "--runs-root", str(root / "runs")]
    assert main([*args, "--registry", str(root / "registry.sqlite"), "--no-registry"]) == 0
    return capsys.readouterr().out


def test_gc_while_training_reads_skips_that_cache_and_training_finishes(tmp_path, capsys):
    reference = CacheRoot(tmp_path / "reference" / "cache")
    build_cache(reference, LENGTHS, {0: 8, 1: 8, 2: 8}, shard_size=5, splits=SPLITS)
    expected = train_task(open_cache(reference.location(KEY)), CONFIG, 3, progress=False)

    root = CacheRoot(tmp_path / "cache")
    build_cache(root, LENGTHS, {0: 8, 1: 8, 2: 8}, shard_size=5, splits=SPLITS)  # the same bytes
    other = "cd" * 16
    build_cache(root, LENGTHS, {0: 8}, key=other)  # unused by anyone: gc removes it
    outputs = []

    def gc_mid_training(epoch: int, record: dict) -> None:
        if epoch == 1:  # the run is between epochs, its reader open: no run record points at the cache yet
            outputs.append(_gc(capsys, tmp_path))

    reader = open_cache(root.location(KEY))
    result = train_task(reader, CONFIG, 3, progress=False, on_epoch_end=gc_mid_training)
    (out,) = outputs
    assert f"skipping {KEY}: a running process is reading it" in out
    assert f"removing {other}" in out and "removed 1 cache(s)" in out
    assert root.keys() == [KEY]
    assert _without_timing(result) == _without_timing(expected)  # training never noticed

    reader.lease.release()  # the run is over (and, here, recorded nowhere): now it is garbage
    assert f"removing {KEY}" in _gc(capsys, tmp_path)
    assert root.keys() == []


HOLD_READER = textwrap.dedent(
    """
    import sys
    from unipt.pipeline.cache.opener import open_cache
    reader = open_cache(sys.argv[1])
    reader.read_example(0, 0)
    print("reading", flush=True)
    sys.stdin.read()  # hold the cache open until the test closes our stdin
    """
)


def test_gc_leaves_a_cache_that_another_process_reads(tmp_path, capsys):
    root = CacheRoot(tmp_path / "cache")
    build_cache(root, LENGTHS, {0: 8})
    reader = subprocess.Popen(
        [sys.executable, "-c", HOLD_READER, str(root.location(KEY))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "reading"
        runs = str(tmp_path / "runs")
        dry = main(["cache", "gc", "--cache-root", str(root.root), "--runs-root", runs, "--no-registry"])
        assert dry == 0 and f"skipping {KEY}" in capsys.readouterr().out
        assert f"skipping {KEY}: a running process is reading it" in _gc(capsys, tmp_path)
        assert root.keys() == [KEY]
    finally:
        reader.stdin.close()
        reader.wait(timeout=30)
    assert f"removing {KEY}" in _gc(capsys, tmp_path)  # the reader exited: its lease went with it
    assert root.keys() == []


def test_gc_include_partial_skips_a_store_being_extracted(tmp_path, capsys):
    from unipt.pipeline.cache.locks import exclusive

    root = CacheRoot(tmp_path / "cache")
    build_cache(root, LENGTHS, {0: 8}, commit=False)
    args = [
        "--cache-root",
        str(root.root),
        "--runs-root",
        str(tmp_path / "runs"),
        "--registry",
        str(tmp_path / "r"),
        "--no-registry",
    ]
    with exclusive(root.lock_location(KEY)):  # what `unipt extract` holds while it builds the key
        assert main(["cache", "gc", "--yes", "--include-partial", *args]) == 0
        assert f"skipping {KEY} (unfinished): an extraction is building it" in capsys.readouterr().out
        assert root.partial_keys() == [KEY]
    assert main(["cache", "gc", "--yes", "--include-partial", *args]) == 0
    assert f"removing {KEY} (unfinished)" in capsys.readouterr().out
    assert root.partial_keys() == []


def test_lease_files_stay_out_of_cache_listings(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, LENGTHS, {0: 8})
    reader = open_cache(root.location(KEY))
    assert (tmp_path / ".leases" / f"{KEY}.lock").exists() and reader.lease.held
    assert root.keys() == [KEY] and root.partial_keys() == []
    # A cache opened by a path outside any cache root gets no lock files beside it.
    shutil.copytree(tmp_path / KEY, tmp_path / "copy")
    assert not open_cache(tmp_path / "copy").lease.held
    assert json.loads((tmp_path / "copy" / "zarr.json").read_text())["attributes"]["complete"]
