"""Extraction vs the backbone alone: how much the pipeline (Ray, sharding, encoding, compression,
writes, commit) adds to the pure forward pass, and how extraction scales from 1 to 2 Ray workers.

On the same examples of the default experiment (configs/rt_minilm.yaml: Rotten Tomatoes through
all-MiniLM-L6-v2, every hidden state, fp16):

- **pure forward**: the backbone's ``encode`` in this process (tokenize, forward, hidden states to host
  memory) over the same shards the pipeline cuts, nothing written; the median of ``--repeats`` passes
  after a warm-up.
- **extraction**: ``unipt extract``'s own path (``unipt.pipeline.experiment.extract``) into a fresh
cache, on a
  local Ray instance started once; ``extract.workers`` = each of ``--workers``. Split into *startup*
  (actors start and load the backbone) and *extraction proper* (first shard to committed cache).

The table's ``proper/forward`` is the pipeline's overhead on top of the backbone's own work (1.00 =
none; the goal is at most 1.15); ``wall/forward`` also counts the startup. Results go to
benchmarks/results/extract_overhead.json. Runs on CUDA when a GPU is visible (pure forward and
workers alike).

    python benchmarks/extract_overhead.py                  # 2,000 snippets, 1 and 2 workers, 3 repeats
    python benchmarks/extract_overhead.py --limit 300 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402  (before Ray: see extract/runner.py)

from benchmarks.common import machine, print_table, write_report  # noqa: E402
from unipt.pipeline import experiment  # noqa: E402
from unipt.pipeline.config import load_config  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "extract_overhead.json"


def pure_forward_seconds(prep, repeats: int) -> tuple[float, int]:
    """Median seconds of the backbone's encode over every example, in this process; and the token count."""
    from unipt.extract.backbones import load_backbone
    from unipt.extract.spec import BackboneLoadSpec

    settings = prep.config.primary_backbone
    backbone = load_backbone(
        BackboneLoadSpec(prep.primary.identity.local_dir, autocast=prep.config.extract.autocast)
    )
    column = "image" if backbone.input_kind == "image" else "text"
    inputs = prep.dataset.table.column(column).to_pylist()
    layers = (
        list(range(backbone.describe()["num_hidden_states"])) if settings.layers == "all" else settings.layers
    )
    compute = "float16" if prep.config.extract.dtype == "float16" else "float32"
    torch.set_num_threads(os.cpu_count() or 1)
    backbone.encode(inputs[:64], layers, settings.max_length, settings.batch_size, compute)  # warm-up
    # The same units of work as the pipeline's: one encode per shard (batches sorted by length within it).
    size = prep.config.extract.shard_size
    shards = [inputs[start : start + size] for start in range(0, len(inputs), size)]
    times, tokens = [], 0
    for _ in range(repeats):
        t0, tokens = time.perf_counter(), 0
        for shard in shards:
            encoded = backbone.encode(shard, layers, settings.max_length, settings.batch_size, compute)
            tokens += int(encoded.layers[layers[0]].shape[0])
        times.append(time.perf_counter() - t0)
    return statistics.median(times), tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/rt_minilm.yaml")
    parser.add_argument(
        "--limit", type=int, default=2000, help="a seeded sample of this many examples (0 = every example)"
    )
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    import ray

    scratch = Path(tempfile.mkdtemp(prefix="unipt-extract-bench-"))
    base = [*([f"dataset.limit={args.limit}"] if args.limit else []), *args.set]
    prep = experiment.prepare(load_config(args.config, [*base, f"storage.cache_root={scratch / 'unused'}"]))
    forward_s, tokens = pure_forward_seconds(prep, args.repeats)
    print(f"pure forward: {forward_s:.2f}s for {len(prep.dataset)} examples, {tokens} tokens", flush=True)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    rows = []
    try:
        for workers in args.workers:
            runs = []
            for repeat in range(args.repeats):
                root = scratch / f"w{workers}-r{repeat}"
                run_prep = experiment.prepare(
                    load_config(
                        args.config, [*base, f"extract.workers={workers}", f"storage.cache_root={root}"]
                    )
                )
                result = experiment.extract(run_prep, progress=False)
                stats = result.stats
                runs.append(
                    {
                        "wall_s": result.seconds,
                        "startup_s": stats["startup_s"],
                        "proper_s": stats["shards_s"] + stats["commit_s"],
                        "worker_forward_s": stats["forward_s"],
                        "worker_write_s": stats["write_s"],
                        "bytes": result.bytes_written,
                    }
                )
            median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append({"workers": workers, **median, "runs": runs})
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)

    one = next((r for r in rows if r["workers"] == 1), rows[0])
    columns = (
        "workers",
        "wall s",
        "startup s",
        "proper s",
        "forward s",
        "proper/forward",
        "wall/forward",
        "speedup vs 1",
    )
    table = [
        (
            str(r["workers"]),
            f"{r['wall_s']:.2f}",
            f"{r['startup_s']:.2f}",
            f"{r['proper_s']:.2f}",
            f"{forward_s:.2f}",
            f"{r['proper_s'] / forward_s:.3f}",
            f"{r['wall_s'] / forward_s:.3f}",
            f"{one['proper_s'] / r['proper_s']:.2f}",
        )
        for r in rows
    ]
    print_table(columns, table)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report = {
        "benchmark": "extract_overhead",
        "machine": {**machine(), "device": device},
        "config": args.config,
        "overrides": base,
        "examples": len(prep.dataset),
        "tokens": tokens,
        "pure_forward_s": forward_s,
        "repeats": args.repeats,
        "rows": rows,
    }
    write_report(Path(args.out), report, ["workers", "wall_s", "startup_s", "proper_s", "worker_forward_s"])


if __name__ == "__main__":
    main()
