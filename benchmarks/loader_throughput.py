"""Is the cache loader ever the bottleneck? Loader throughput against raw reads and against what UniPT eats.

On a real cache (configs/rt_minilm.yaml: Rotten Tomatoes through all-MiniLM-L6-v2, every hidden state,
built by the pipeline's own ``do_extract``), over the train split, each the median of ``--repeats``:

- **raw**: read + decode every stored layer's rows of the train split straight from Zarr, in the same
  contiguous row ranges (blocks) the loader reads, shuffled the same way; no padding, no batching,
  no thread, through the reader's checked read path (every chunk's crc32c and the manifest's position
  checks, exactly as the loader reads). The ceiling for the bytes the loader has to move.
- **raw (zarrs pipeline)**: the same reads through the ``zarrs`` Rust codec pipeline, where it is installed
  (on a plain store: zarrs cannot wrap the reader's checking store; see :mod:`benchmarks.loader_peers`).
- **numpy copy ceiling**: a plain numpy copy of the same decoded rows, block by block: memory speed.
- **loader**: one full epoch of :class:`unipt.train.loader.CacheBatches` with shuffling on (block order,
  shuffle buffer, padding into batches) working ahead in its background threads, as it feeds a GPU.
- **loader, blocks copied out of the maps first (before)**: the same epoch with each block read into
  arrays of its own before padding, as the loader did before its blocks became views into the memory maps.
- **loader between steps**: the same epoch read and padded in the calling thread, as training on the
  CPU uses it (``train.loader_background: auto``).
- **peer**: the same examples stored as SAELens stores activations (an uncompressed, memory-mapped Arrow
  IPC file, one fixed-size row per example padded to the split's longest), read in the loader's own
  shuffled batches into the same padded float32 batches. Its bytes on disk per example are reported too.
- **consumption**: UniPT training steps (``unipt.train.methods.build_model``'s model for the config:
  forward, backward, AdamW step) on one shuffled epoch's batches, made beforehand and held in memory
  (``--steps N``: its first N batches): the rate the model needs.
- **train from loader**: the same steps on the same epoch's batches, fed by the loader as training
  feeds it (``CacheBatches.for_split`` with the config's settings): what training actually gets. Both
  passes step through identical batches, so their ratio is the loader's cost alone, not a difference in
  padding between two samples. Where ``train.keep_decoded_mb`` keeps the split's decoded blocks (``auto``:
  the split fits ``train.loader_memory_mb``), an untimed epoch fills them first: the timed passes are
  what the epochs after the first get.
- **train from loader, reading every epoch**: the same with ``train.keep_decoded_mb: 0``: every pass
  reads and decodes its blocks (a first epoch, or a split too large to keep).
- **... other mode**: that again with the loader in the mode ``train.loader_background: auto`` did not
  choose for this device (on the CPU: reading ahead in background threads), to show why.

The loader rows (**loader**, **loader between steps**) always read and decode: they are compared with raw.

Samples/s counts training examples per wall second; samples/CPU-s per second of this process's CPU
time (all threads), which a machine shared with other work disturbs far less. MB/s is MB (1e6 bytes)
of decoded cache rows (fp16 stays 2 bytes a value). The stages take turns within each repeat.
``loader/raw`` is what batching and padding cost; ``loader/consumption`` > 1 means the loader delivers
faster than a training step consumes, so it is not the bottleneck; ``from loader/consumption`` near 1
means the reads hide behind the compute. Reads come from the page cache (the store was just written or
read), so this is decode + Zarr + collate speed, not disk speed. Writes
benchmarks/results/loader_throughput.json and .csv.

    python benchmarks/loader_throughput.py                       # 3,000 snippets, 3 repeats
    python benchmarks/loader_throughput.py --limit 1000 --repeats 1 --steps 10   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402  (before Ray: see extract/runner.py)

from benchmarks import loader_peers  # noqa: E402
from benchmarks.common import RESULTS, machine, print_table, write_report  # noqa: E402
from unipt.pipeline.cache.activation_cache import ActivationCache  # noqa: E402
from unipt.pipeline.cache.opener import open_cache  # noqa: E402
from unipt.pipeline.cache.reader import CacheReader  # noqa: E402
from unipt.pipeline.cache.view import ViewReader  # noqa: E402
from unipt.pipeline.config import TrainConfig, load_config  # noqa: E402
from unipt.pipeline.tasks import get_task  # noqa: E402
from unipt.train.fit import adamw  # noqa: E402
from unipt.train.loader import Batch, CacheBatches, to_device  # noqa: E402
from unipt.train.methods import build_model  # noqa: E402
from unipt.train.prefetch import host_to_device  # noqa: E402
from unipt.train.tasks import task_head  # noqa: E402

MB = 1e6
RAW, RAW_ZARRS, COPY = "raw read+decode", "raw read+decode (zarrs pipeline)", "numpy copy ceiling"
LOADER, PEER = "loader (CacheBatches)", "peer: memory-mapped Arrow (SAELens-style)"
LOADER_INLINE = "loader between steps (CPU training)"
NEED, FED = "UniPT step consumption", "UniPT training from loader"
FED_READING = "UniPT training from loader, reading every epoch"
FED_OTHER = "UniPT training from loader, reading every epoch, other mode"  # the loader mode auto passed over
RAW_ZARR = "raw read+decode through zarr-python (same cache)"  # the read path before pipeline/chunk_reader
TRIALS_1, TRIALS_2 = "loader, 1 trial process", "loader, 2 trial processes in parallel (total)"
# The loader as it was before its blocks became views into the memory maps: each block copied out first.
LOADER_COPYING = "loader, blocks copied out of the maps first (before)"
# What earlier runs found (the README keeps only the latest table; the numbers are in the git history of
# benchmarks/results/loader_throughput*.json). Written into every report as ``notes``.
NOTES = (
    "2026-12-01: Blosc-zstd cache read through zarr-python: raw 6,472 samples/s, loader 0.62x raw, "
    "Arrow peer 4.3x raw; zarrs pipeline 1.15x raw (unchecked store); an lz4 cache read 1.45x "
    "faster for 18% more bytes.",
    "2026-12-01: reading one block and padding one batch ahead (was four blocks, two batches): "
    "loader/raw 0.81.",
    "2026-12-01: CPU training reads between steps (loader_background: auto) and keeps the decoded split "
    "(keep_decoded_mb: auto): training from the loader 1.00-1.04x the pure step; reading every epoch "
    "0.87-0.91.",
    "2026-12-01: padding as one slice copy per example and layer; a vectorised gather (numpy take, torch "
    "index_select/index_copy_) measured slower, and again with the memory-mapped read path (issue 28).",
    "Issue 28: extract.codec none is the default and local uncompressed chunks are read out of memory maps "
    "(pipeline/cache/chunk_reader.py), crc32c checked once per chunk file and reader; the row "
    "'raw read+decode through zarr-python' is the same cache read the old way.",
    "2026-12-07: the loader's blocks are views into the maps (ActivationCache.stored_pieces): padding copies "
    "each row once, from the page cache into the batch; ~2x the loader's samples per CPU-second. The row "
    "'loader, blocks copied out of the maps first (before)' is the previous loader. A vectorised gather + "
    "scatter per source block (np.take, then a fancy-index store) measured no faster than the per-example "
    "slice copies again, and np.empty with zeroed tails no faster than np.zeros.",
)
COLUMNS = (
    "stage",
    "samples",
    "seconds",
    "cpu_seconds",
    "samples_per_s",
    "samples_per_cpu_s",
    "mb_per_s",
    "vs_raw",
    "vs_consumption",
    "vs_consumption_cpu",
)


def loader_for(
    reader: ActivationCache, train: TrainConfig, seed: int = 0, background: bool | None = None
) -> CacheBatches:
    """The train split's batches exactly as :func:`unipt.train.tasks.train_task` builds them; ``background``
    overrides ``train.loader_background`` (True: reading ahead in threads, as for a GPU)."""
    if background is not None:
        train = train.model_copy(update={"loader_background": background})
    return CacheBatches.for_split(reader, "train", train, seed, shuffle=True)


def raw_pass(reader: CacheReader, loader: CacheBatches, seed: int) -> tuple[float, int]:
    """Seconds to read + decode the loader's blocks of every layer, one layer after another through the
    reader's own checked read path (``read_rows``), no thread, no padding; the decoded bytes."""
    offsets = loader.offsets
    order = np.random.default_rng(seed).permutation(len(loader.blocks))
    decoded = 0
    started = time.perf_counter()
    for i in order:
        block = loader.blocks[i]
        for layer in loader.layers:
            start, stop = int(offsets[layer][block[0], 0]), int(offsets[layer][block[-1], 1])
            decoded += reader.read_rows(layer, start, stop).nbytes
    return time.perf_counter() - started, decoded


@contextlib.contextmanager
def copying_blocks(loader: CacheBatches) -> Iterator[None]:
    """``loader`` reading each block out of the maps into arrays of its own before padding (the loader before
    its blocks were views), for the before/after row."""
    loader._reads_as_stored = lambda: False  # type: ignore[method-assign]
    try:
        yield
    finally:
        del loader._reads_as_stored


@contextlib.contextmanager
def through_zarr(reader: CacheReader) -> Iterator[None]:
    """Reads of ``reader`` (and of a view's segment readers) through zarr-python's codec pipeline instead
    of :mod:`unipt.pipeline.cache.chunk_reader`'s memory maps, for the before/after row; no-op on a compressed
    cache."""
    # A view holds no chunks of its own: its segments' readers do the reading.
    stores = [s for s in (reader, *getattr(reader, "segments", [])) if isinstance(s, CacheReader)]
    saved = [store._mapped for store in stores]
    for store in stores:
        store._mapped = None
    try:
        yield
    finally:
        for store, mapped in zip(stores, saved, strict=True):
            store._mapped = mapped


def _trial(path: str, train: TrainConfig, repeats: int, start: Any, results: Any) -> None:
    """One sweep trial's reading, in its own process: its own reader of the cache, the loader training would
    use (reading every epoch, working ahead), ``repeats`` epochs once every trial is ready."""
    reader = open_cache(path)
    loader = loader_for(reader, train, background=True)
    loader_pass(loader, epoch=repeats)  # warm-up, as in the main process: threads, allocator, page cache
    start.wait()
    results.put([loader_pass(loader, epoch=r) for r in range(repeats)])
    loader.close()


def trials_pass(path: str, train: TrainConfig, repeats: int, trials: int) -> list[tuple[float, float, int]]:
    """Per repeat (wall seconds, CPU seconds: not measured here, examples): ``trials`` processes, each
    reading the train split once per repeat from the same cache (one copy in the page cache), at once.
    Seconds are the slowest trial's, examples the trials' total."""
    context = multiprocessing.get_context("spawn")  # torch and reader threads do not survive a fork
    start, results = context.Barrier(trials), context.Queue()
    workers = [
        context.Process(target=_trial, args=(path, train, repeats, start, results)) for _ in range(trials)
    ]
    for worker in workers:
        worker.start()
    passes = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    return [
        (max(p[r][0] for p in passes), float("nan"), sum(p[r][1] for p in passes)) for r in range(repeats)
    ]


def loader_pass(loader: CacheBatches, epoch: int) -> tuple[float, int]:
    """Seconds for one shuffled epoch of padded batches; the number of examples delivered."""
    started, samples = time.perf_counter(), 0
    for batch in loader.epoch(epoch):
        samples += len(batch.labels)
    return time.perf_counter() - started, samples


class Stepper:
    """UniPT training steps as unipt.train.fit runs them (AdamW, the task's head and loss: cross-entropy for
    classification, MSE on standardised targets for regression), on the CPU or a GPU."""

    def __init__(self, reader: ActivationCache, train: TrainConfig, device: torch.device) -> None:
        torch.manual_seed(0)
        self.device = device
        train_labels = reader.labels()[reader.split_indices("train")]
        self.head = task_head(get_task(train.task), list(reader.label_names), train_labels)
        self.model = build_model(reader, train, num_outputs=self.head.outputs).to(device)
        self.model.train()
        self.optimizer = adamw(self.model, train, device)  # fused on CUDA, as training's

    def step(self, batch: Batch) -> None:
        outputs, _ = self.model(*to_device(batch, self.device, self.model))  # as training feeds it
        loss = self.head.loss(outputs.float(), host_to_device(batch.labels, self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def consumption_pass(stepper: Stepper, batches: list[Batch]) -> tuple[float, int]:
    started = time.perf_counter()
    for batch in batches:
        stepper.step(batch)
    stepper.sync()
    return time.perf_counter() - started, sum(len(b.labels) for b in batches)


def train_from_loader_pass(
    stepper: Stepper, loader: CacheBatches, epoch: int, steps: int | None = None
) -> tuple[float, int]:
    """Seconds for ``steps`` training steps (all: the epoch) fed by ``loader``; examples stepped on."""
    started, samples = time.perf_counter(), 0
    for batch in islice(loader.epoch(epoch), steps):
        stepper.step(batch)
        samples += len(batch.labels)
    stepper.sync()
    return time.perf_counter() - started, samples


def _timed(run: Callable[[], tuple[float, int]]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process over all its threads, count) of one pass."""
    cpu = time.process_time()
    seconds, count = run()
    return seconds, time.process_time() - cpu, count


def measure(
    reader: CacheReader, train: TrainConfig, repeats: int, steps: int, device: torch.device
) -> dict[str, Any]:
    """Every stage's median seconds over ``repeats`` passes, with samples and decoded bytes.

    The stages take turns within each repeat, so a load that comes and goes on a shared machine
    lands on all of them alike and the ratios between them stay meaningful.
    """
    reading = train.model_copy(update={"keep_decoded_mb": 0})  # every pass reads and decodes
    loader = loader_for(reader, reading, background=True)
    inline = loader_for(reader, reading, background=False)
    training = loader_for(reader, train)  # what training on ``device`` uses
    fed_reading = loader_for(reader, reading)
    other = loader_for(reader, reading, background=not training.prefetch_blocks)
    samples = len(loader.indices)
    _, decoded = raw_pass(reader, loader, seed=0)  # warm the page cache: time decoding, not disk
    stepper = Stepper(reader, train, device)
    consumption_pass(stepper, list(islice(inline.epoch(repeats), 2)))  # warm-up: allocator, AdamW state
    steps = steps or None  # 0: the whole epoch
    if training.keep_decoded_bytes:
        loader_pass(training, epoch=repeats)  # fills the kept blocks: the timed passes are later epochs
    stepped = 0
    blocks = loader_peers.decoded_blocks(reader, loader)
    zarrs = loader_peers.zarrs_reads(reader)
    with tempfile.TemporaryDirectory(prefix="unipt-arrow-peer-") as scratch:
        peer = loader_peers.ArrowPeer(reader, loader, Path(scratch) / "activations.arrow")
        peer.epoch(0)  # the file was just written: its pages are cached, as the Zarr store's are
        runs: dict[str, list[tuple[float, float, int]]] = {
            key: []
            for key in (
                "raw",
                "raw_zarr",
                "zarrs",
                "copy",
                "loader",
                "copying",
                "inline",
                "peer",
                "need",
                "fed",
                "reading",
                "other",
            )
        }
        for r in range(repeats):
            runs["raw"].append(_timed(lambda r=r: (raw_pass(reader, loader, seed=r)[0], samples)))
            with through_zarr(reader):
                runs["raw_zarr"].append(_timed(lambda r=r: (raw_pass(reader, loader, seed=r)[0], samples)))
            if zarrs is not None:
                runs["zarrs"].append(_timed(lambda r=r: (loader_peers.zarrs_pass(zarrs, loader, r), samples)))
            runs["copy"].append(_timed(lambda r=r: (loader_peers.copy_pass(blocks, seed=r), samples)))
            runs["loader"].append(_timed(lambda r=r: loader_pass(loader, epoch=r)))
            with copying_blocks(loader):
                runs["copying"].append(_timed(lambda r=r: loader_pass(loader, epoch=r)))
            runs["inline"].append(_timed(lambda r=r: loader_pass(inline, epoch=r)))
            runs["peer"].append(_timed(lambda r=r: _peer_pass(peer, r)))
            # Epoch r's batches, made before the clock starts: the steps the loader-fed pass will take.
            batches = list(islice(inline.epoch(r), steps))
            stepped = len(batches)
            runs["need"].append(_timed(lambda b=batches: consumption_pass(stepper, b)))
            del batches
            runs["fed"].append(_timed(lambda r=r: train_from_loader_pass(stepper, training, r, steps)))
            runs["reading"].append(_timed(lambda r=r: train_from_loader_pass(stepper, fed_reading, r, steps)))
            runs["other"].append(_timed(lambda r=r: train_from_loader_pass(stepper, other, r, steps)))
        peer_bytes = peer.nbytes_on_disk()
        peer_width = peer.width
        peer.close()
    blocks.clear()  # the decoded copy of the split: free it before the caller goes on
    # Sweep trials on one machine: each its own process and reader, all sharing the page cache's one copy.
    runs["trials_1"] = trials_pass(reader.source, reading, repeats, trials=1)
    runs["trials_2"] = trials_pass(reader.source, reading, repeats, trials=2)
    for each in (loader, inline, training, fed_reading, other):
        each.close()

    def stage(name: str, passes: list[tuple[float, float, int]], moved: int | None) -> dict[str, Any]:
        seconds = statistics.median(w for w, _, _ in passes)
        cpu_seconds = statistics.median(c for _, c, _ in passes)
        cpu_seconds = None if cpu_seconds != cpu_seconds else cpu_seconds  # NaN: other processes' CPU
        count = passes[0][2]
        return {
            "stage": name,
            "samples": count,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "samples_per_s": count / seconds,
            "samples_per_cpu_s": count / cpu_seconds if cpu_seconds else None,
            "mb_per_s": moved / MB / seconds if moved is not None else None,
            "runs_s": [w for w, _, _ in passes],
        }

    # Consumption moves no cache bytes; its MB/s is what it would need at the cache's bytes per example.
    consumed_bytes = int(decoded / samples * runs["need"][0][2])
    named = {
        "raw": stage(RAW, runs["raw"], decoded),
        "raw_zarr": stage(RAW_ZARR, runs["raw_zarr"], decoded),
        "zarrs": stage(RAW_ZARRS, runs["zarrs"], decoded) if runs["zarrs"] else None,
        "copy": stage(COPY, runs["copy"], decoded),
        "loader": stage(LOADER, runs["loader"], decoded),
        "copying": stage(LOADER_COPYING, runs["copying"], decoded),
        "inline": stage(LOADER_INLINE, runs["inline"], decoded),
        "peer": stage(PEER, runs["peer"], decoded),
        "need": stage(NEED, runs["need"], consumed_bytes),
        "fed": stage(FED, runs["fed"], int(decoded / samples * runs["fed"][0][2])),
        "reading": stage(FED_READING, runs["reading"], int(decoded / samples * runs["reading"][0][2])),
        "other": stage(FED_OTHER, runs["other"], int(decoded / samples * runs["other"][0][2])),
        "trials_1": stage(TRIALS_1, runs["trials_1"], decoded),
        "trials_2": stage(TRIALS_2, runs["trials_2"], 2 * decoded),
    }
    rows = [row for row in named.values() if row is not None]
    raw_rate, need, need_cpu = (
        named["raw"]["samples_per_s"],
        named["need"]["samples_per_s"],
        named["need"]["samples_per_cpu_s"],
    )
    for row in rows:
        row["vs_raw"] = row["samples_per_s"] / raw_rate
        row["vs_consumption"] = row["samples_per_s"] / need
        cpu_rate = row["samples_per_cpu_s"]
        row["vs_consumption_cpu"] = cpu_rate / need_cpu if cpu_rate and need_cpu else None
    # The machine's speed drifts between repeats (a shared VM: the same pass varies by a third), so the
    # training passes are also compared within each repeat, each against that repeat's pure-step pass.
    for key in ("fed", "reading", "other"):
        paired = [need[0] / fed[0] for need, fed in zip(runs["need"], runs[key], strict=True)]
        named[key]["vs_consumption_paired"] = statistics.median(paired)
    cache_bytes = reader.nbytes_on_disk()
    return {
        "train_examples": samples,
        "decoded_bytes": decoded,
        "blocks": len(loader.blocks),
        "batch_size": train.batch_size,
        "consumption_steps": stepped,
        "training_loader_background": training.prefetch_blocks > 0,
        "rows": rows,
        "loader_over_raw": named["loader"]["vs_raw"],
        "loader_between_steps_over_raw": named["inline"]["vs_raw"],
        "loader_over_consumption": named["loader"]["vs_consumption"],
        "loader_over_consumption_cpu": named["loader"]["vs_consumption_cpu"],
        "training_from_loader_over_consumption": named["fed"]["vs_consumption"],
        "training_reading_every_epoch_over_consumption": named["reading"]["vs_consumption"],
        "training_other_mode_over_consumption": named["other"]["vs_consumption"],
        "training_keeps_decoded_blocks": training.keep_decoded_bytes > 0,
        "raw_over_copy_ceiling": named["raw"]["mb_per_s"] / named["copy"]["mb_per_s"],
        "raw_over_raw_through_zarr": named["raw"]["mb_per_s"] / named["raw_zarr"]["mb_per_s"],
        "two_trials_over_one": named["trials_2"]["samples_per_s"] / named["trials_1"]["samples_per_s"],
        "cache_codec": reader.layout.codec,
        "zarrs_over_raw": named["zarrs"]["vs_raw"] if named["zarrs"] else None,
        "loader_over_arrow_peer": named["loader"]["samples_per_s"] / named["peer"]["samples_per_s"],
        "loader_over_arrow_peer_cpu": named["loader"]["samples_per_cpu_s"]
        / named["peer"]["samples_per_cpu_s"],
        "raw_over_copy_ceiling_cpu": named["raw"]["samples_per_cpu_s"] / named["copy"]["samples_per_cpu_s"],
        "loader_over_loader_copying_blocks": named["loader"]["samples_per_s"]
        / named["copying"]["samples_per_s"],
        "loader_over_loader_copying_blocks_cpu": (
            named["loader"]["samples_per_cpu_s"] / named["copying"]["samples_per_cpu_s"]
        ),
        # Bytes per train example on disk: ours over the whole cache (every split), the peer's for its file.
        "bytes_per_example": {
            "cache": cache_bytes / reader.num_examples,
            "arrow_peer": peer_bytes / samples,
            "arrow_peer_padded_to": peer_width,
        },
    }


def _peer_pass(peer: loader_peers.ArrowPeer, epoch: int) -> tuple[float, int]:
    started = time.perf_counter()
    count = peer.epoch(epoch)
    return time.perf_counter() - started, count


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/rt_minilm.yaml")
    parser.add_argument("--limit", type=int, default=3000, help="dataset.limit: a seeded sample (0: all)")
    parser.add_argument("--dtype", default="float16", help="extract.dtype of the cache")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--steps", type=int, default=0, help="batches per training pass (0: a whole epoch, the default)"
    )
    parser.add_argument("--cache-root", default=".unipt/cache")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default=str(RESULTS / "loader_throughput.json"))
    args = parser.parse_args()

    from unipt.pipeline import experiment
    from unipt.train.fit import pick_device

    overrides = [f"extract.dtype={args.dtype}"] + ([f"dataset.limit={args.limit}"] if args.limit else [])
    overrides += [f"storage.cache_root={args.cache_root}", *args.set]
    config = load_config(args.config, overrides)
    prep = experiment.prepare(config)
    experiment.extract(prep, progress=False)
    reader = experiment.open_for_training(prep)
    if not isinstance(reader, (CacheReader, ViewReader)):
        raise SystemExit("loader_throughput reads a Zarr cache")
    device = pick_device(config.train.device)
    load_before = os.getloadavg()
    result = measure(reader, config.train, args.repeats, args.steps, device)
    # Other work on the machine shows in every wall-clock rate: the 1-minute load average around the run.
    result["load_average_1min"] = {"before": load_before[0], "after": os.getloadavg()[0]}

    print(
        f"\n{result['train_examples']} train examples, {result['decoded_bytes'] / MB:.0f} MB decoded, "
        f"{result['blocks']} blocks, batch {result['batch_size']}, {args.dtype} cache, device {device}"
    )
    print_table(
        ("stage", "samples/s", "MB/s", "vs raw", "vs consumption", "samples/CPU-s", "vs cons. (CPU)"),
        [
            (
                r["stage"],
                f"{r['samples_per_s']:,.0f}",
                f"{r['mb_per_s']:,.0f}",
                f"{r['vs_raw']:.2f}",
                f"{r['vs_consumption']:.2f}",
                "n/a" if r["samples_per_cpu_s"] is None else f"{r['samples_per_cpu_s']:,.0f}",
                "n/a" if r["vs_consumption_cpu"] is None else f"{r['vs_consumption_cpu']:.2f}",
            )
            for r in result["rows"]
        ],
    )
    print(
        f"loader/raw {result['loader_over_raw']:.2f}, loader/consumption "
        f"{result['loader_over_consumption']:.2f} (> 1: the loader is not the bottleneck; per CPU second "
        f"{result['loader_over_consumption_cpu']:.2f}), "
        f"training from loader/consumption {result['training_from_loader_over_consumption']:.2f}"
    )
    paired = {r["stage"]: r["vs_consumption_paired"] for r in result["rows"] if "vs_consumption_paired" in r}
    pairs = ", ".join(f"{k}: {v:.2f}" for k, v in paired.items())
    print(f"training/consumption within each repeat (median): {pairs}")
    zarrs = result["zarrs_over_raw"]
    per_example = result["bytes_per_example"]
    print(
        f"{result['cache_codec']} cache: raw/raw through zarr-python "
        f"{result['raw_over_raw_through_zarr']:.2f}, "
        f"2 trial processes/1 {result['two_trials_over_one']:.2f} (samples/s in total)"
    )
    print(
        f"raw/numpy copy {result['raw_over_copy_ceiling']:.2f} (MB/s), "
        f"zarrs/raw {'n/a (zarrs not usable here)' if zarrs is None else f'{zarrs:.2f}'}, "
        f"loader/Arrow peer {result['loader_over_arrow_peer']:.2f} (samples/s; per CPU second "
        f"{result['loader_over_arrow_peer_cpu']:.2f}), raw/numpy copy per CPU second "
        f"{result['raw_over_copy_ceiling_cpu']:.2f}, loader/loader copying blocks "
        f"{result['loader_over_loader_copying_blocks']:.2f} (per CPU second "
        f"{result['loader_over_loader_copying_blocks_cpu']:.2f}); bytes on disk per example: "
        f"cache {per_example['cache']:,.0f}, Arrow peer {per_example['arrow_peer']:,.0f} "
        f"(padded to {per_example['arrow_peer_padded_to']} tokens)"
    )
    report = {
        "benchmark": "loader_throughput",
        "machine": machine(),
        "config": args.config,
        "notes": list(NOTES),
        "settings": {
            "limit": args.limit,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "steps": args.steps,
            "overrides": args.set,
            "device": str(device),
        },
        "cache": {"key": prep.key, "path": reader.source, "bytes_on_disk": reader.nbytes_on_disk()},
        **result,
    }
    write_report(Path(args.out), report, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
