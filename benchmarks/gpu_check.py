"""The GPU check (issue 20): on a machine with one CUDA GPU, one table of what the GPU gets.

On ``--limit`` snippets of the default experiment (configs/rt_minilm.yaml):

- extraction wall time against the backbone's pure forward pass, fp32 and ``extract.autocast: bfloat16``
  (``float16`` on cards that only emulate bf16);
- loader samples/s against what UniPT's GPU training step consumes, and the fraction of the step time
  spent waiting for data when training from the loader (the GPU must not wait);
- the read path against recomputing (issue 28): the cache's read rate (decoded GB/s) and the backbone's
  forward rate (tokens/s) on the training device, as ``unipt plan`` measures them, and one pass of the
  data read from the cache against one recomputed (the read rate at which they tie);
- seconds per epoch training from the cache against UniPT online (backbone in memory), peak GPU memory
  of each, and the cache's speed-up per epoch;
- training from the cache with AMP on (auto) and off.

The CPU parts (extracting the cache, the loader against a CPU step) run everywhere; without a GPU the
check prints ``no GPU`` after them and exits 0, so CI can smoke-test it (``--limit 120 --epochs 1``).
``benchmarks/gpu_check.sh`` is the entry point (it makes the environment first when there is none).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402  (before Ray: see extract/runner.py)

from benchmarks.common import machine, print_table  # noqa: E402
from benchmarks.loader_throughput import Stepper, loader_for, measure  # noqa: E402
from unipt.pipeline import experiment  # noqa: E402
from unipt.pipeline.config import ExperimentConfig, load_config  # noqa: E402
from unipt.pipeline.cuda_support import fast_half  # noqa: E402
from unipt.pipeline.experiment.forward_timing import forward_rate  # noqa: E402
from unipt.pipeline.experiment.plan import read_rate  # noqa: E402
from unipt.train.loader import CacheBatches  # noqa: E402


class LiveRows(list):
    """The table's rows, each printed as it is measured: a check stopped by its time limit keeps them."""

    def append(self, row: tuple[str, str, str]) -> None:
        print("row: " + " | ".join(row), flush=True)
        super().append(row)

    def __iadd__(self, rows: Any) -> LiveRows:
        for row in rows:
            self.append(row)
        return self


def waiting_fraction(stepper: Stepper, loader: CacheBatches, epoch: int = 0) -> tuple[float, float]:
    """(fraction of a training epoch's wall time spent waiting for the next batch, samples/s)."""
    waited, samples = 0.0, 0
    started = time.perf_counter()
    batches = iter(loader.epoch(epoch))
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - t0
        if batch is None:
            break
        stepper.step(batch)
        samples += len(batch.labels)
    stepper.sync()
    total = time.perf_counter() - started
    return waited / total, samples / total


def pure_forward_seconds(prep: experiment.Prepared, autocast: str) -> float:
    """The backbone's own encode over the same shards the pipeline cuts, in this process, nothing written."""
    from unipt.extract.backbones import load_backbone
    from unipt.extract.spec import BackboneLoadSpec

    settings = prep.primary.config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = BackboneLoadSpec(prep.primary.identity.local_dir, autocast=autocast, device=device)
    backbone = load_backbone(spec)
    texts = prep.dataset.table.column("text").to_pylist()
    count = backbone.describe()["num_hidden_states"]
    layers = list(range(count)) if settings.layers == "all" else list(settings.layers)
    compute = "float16" if prep.config.extract.dtype == "float16" else "float32"
    backbone.encode(texts[:64], layers, settings.max_length, settings.batch_size, compute)  # warm-up
    size = prep.config.extract.shard_size
    started = time.perf_counter()
    for start in range(0, len(texts), size):
        backbone.encode(
            texts[start : start + size], layers, settings.max_length, settings.batch_size, compute
        )
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def read_path_rows(
    prep: experiment.Prepared, reader: Any, config: ExperimentConfig
) -> list[tuple[str, str, str]]:
    """The cache's read rate and the backbone's forward rate (as `unipt plan` measures them), and one pass
    over the data each way: read from the cache, or recomputed by the backbone on the training device."""
    read_bytes, read_s = read_rate(reader, examples=reader.num_examples)
    tokens = int(reader.examples.column("length").to_numpy().sum())
    tokens_s, device = forward_rate(prep, prep.primary.name, config, tokens)
    per_token = read_bytes / max(1, tokens)
    forward_s = tokens / tokens_s
    return [
        (
            "cache read rate",
            f"{read_bytes / read_s / 1e9:.2f} GB/s decoded",
            f"{per_token:,.0f} bytes per token",
        ),
        (
            f"backbone forward ({device})",
            f"{tokens_s:,.0f} tokens/s",
            "steady forward on training batches, in this process",
        ),
        (
            "one pass: cache vs recompute",
            f"read {read_s:.2f}s vs forward {forward_s:.2f}s",
            f"{_faster(read_s, forward_s)}; they tie at {per_token * tokens_s / 1e9:.2f} GB/s",
        ),
    ]


def _faster(cache_s: float, online_s: float) -> str:
    if cache_s <= online_s:
        return f"the cache is {online_s / cache_s:.1f}x faster"
    return f"recomputing is {cache_s / online_s:.1f}x faster"


def with_train(config: ExperimentConfig, **train: Any) -> ExperimentConfig:
    return config.model_copy(update={"train": config.train.model_copy(update=train)})


def epoch_seconds(prep: experiment.Prepared, config: ExperimentConfig) -> tuple[float, float | None, float]:
    """(median seconds per epoch, peak GPU MiB, val acc) of UniPT trained from the cache."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trained = experiment.train(dataclasses.replace(prep, config=config), progress=False)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return statistics.median(h["seconds"] for h in trained.history), peak, trained.metrics["val_acc"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/rt_minilm.yaml")
    parser.add_argument("--limit", type=int, default=2000, help="dataset.limit (a seeded sample)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cache-root", default=".unipt/gpu-check")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()

    import ray

    base = [
        f"dataset.limit={args.limit}",
        f"train.epochs={args.epochs}",
        "train.probe_baseline=false",
        f"storage.cache_root={args.cache_root}",
        *args.set,
    ]
    config = load_config(args.config, base)
    gpu = torch.cuda.is_available()
    print(
        f"gpu check: {machine()['cuda'] or 'no GPU'}, {args.limit} snippets, {args.epochs} epochs", flush=True
    )
    rows = LiveRows()

    # CPU parts, everywhere: the cache (the extraction of the default dtype), the loader against a step.
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    try:
        walls = {}
        # bf16 where the card has bf16 tensor cores; fp16 where bf16 would only be emulated (a T4).
        for autocast in ("none", fast_half(0)) if gpu else ("none",):
            run = load_config(args.config, [*base, f"extract.autocast={autocast}"])
            prep = experiment.prepare(run)
            result = experiment.extract(prep, progress=False)
            result.release()
            walls[autocast] = (prep, result.seconds, result.cache_hit)
    finally:
        ray.shutdown()
    prep, wall, hit = walls["none"]
    reader = experiment.open_for_training(prep)
    device = torch.device("cuda" if gpu else "cpu")
    loader = measure(reader, config.train, repeats=1, steps=10, device=device)
    stages = {row["stage"]: row for row in loader["rows"]}
    feed = stages["loader (CacheBatches)"]["samples_per_s"]
    need = stages["UniPT step consumption"]["samples_per_s"]
    waited, fed = waiting_fraction(Stepper(reader, config.train, device), loader_for(reader, config.train))
    rows += [
        ("loader", f"{feed:,.0f} samples/s", f"raw read {stages['raw read+decode']['samples_per_s']:,.0f}"),
        (f"UniPT step ({device.type})", f"{need:,.0f} samples/s", f"loader/step {feed / need:.2f}"),
        ("training from loader", f"{fed:,.0f} samples/s", f"{waited:.1%} of step time waiting for data"),
    ]
    rows += read_path_rows(prep, reader, config)
    if not gpu:
        print_table(("measure", "value", "note"), rows)
        print(
            "no GPU: the CPU parts ran; run this on a machine with a CUDA GPU for the GPU table", flush=True
        )
        return 0

    for autocast, (run_prep, seconds, cached) in walls.items():
        forward = pure_forward_seconds(run_prep, autocast)
        note = (
            "cache hit: delete --cache-root to time it" if cached else f"wall/forward {seconds / forward:.2f}"
        )
        rows.append((f"extraction (autocast {autocast})", f"{seconds:.1f}s vs forward {forward:.1f}s", note))
    cache_epochs = {}
    for amp in ("auto", "off"):
        per_epoch, peak, val = epoch_seconds(prep, with_train(config, amp=amp))
        cache_epochs[amp] = per_epoch
        rows.append(
            (f"epoch from cache (amp {amp})", f"{per_epoch:.2f}s", f"peak GPU {peak:.0f} MiB, val {val:.3f}")
        )

    from benchmarks.online_baselines import train_online

    torch.cuda.reset_peak_memory_stats()
    online = train_online(
        prep.dataset.table, prep.dataset.label_names, config.backbone, config.train, config.seed,
        "unipt-online", config.extract,
    )  # fmt: skip
    per_epoch = statistics.median(h["seconds"] for h in online.history)
    rows.append(
        (
            "epoch online (amp auto)",
            f"{per_epoch:.2f}s",
            f"peak GPU {online.metrics['peak_cuda_mib']:.0f} MiB",
        )
    )
    cached = cache_epochs["auto"]  # both with AMP on
    rows.append(
        ("cache vs online epoch (amp auto)", f"{per_epoch / cached:.2f}x", _faster(cached, per_epoch))
    )
    print_table(("measure", "value", "note"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
