"""Dataset versions over one activation space: what each version costs, and that B trains the same.

On the default experiment's data (Rotten Tomatoes snippets through MiniLM, configs/rt_minilm.yaml):
version A = 90% of the examples, B = all of them, C = B with 2% of the labels flipped, D = B with
another split seed. Each is extracted in turn into one cache root; per step the backbone's forward
seconds, the bytes written and the total disk are reported. Then UniPT is trained on B through the
incremental path (A, then B) and on B extracted from scratch into a fresh root, same seed, on the CPU.

    python benchmarks/incremental.py [--limit 2000] [--epochs 1]
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, machine, print_table, write_report  # noqa: E402
from unipt.pipeline import experiment  # noqa: E402
from unipt.pipeline.config import load_config  # noqa: E402
from unipt.pipeline.data.table import load_dataset  # noqa: E402
from unipt.pipeline.storage import Location  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "rt_minilm.yaml"


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _versions(folder: Path, limit: int | None) -> dict[str, tuple[Path, list[str]]]:
    base = load_config(CONFIG, [f"dataset.limit={limit}"] if limit else [])
    table = load_dataset(base.dataset).table
    names = load_dataset(base.dataset).label_names
    rows = [
        {"id": i, "text": t, "label": names[label]}
        for i, t, label in zip(
            table.column("example_id").to_pylist(),
            table.column("text").to_pylist(),
            table.column("label").to_pylist(),
            strict=True,
        )
    ]
    rng = random.Random(0)
    dropped = set(rng.sample(range(len(rows)), len(rows) // 10))
    flipped = set(rng.sample(range(len(rows)), len(rows) // 50))
    other = {names[0]: names[1], names[1]: names[0]}
    c_rows = [dict(r, label=other[r["label"]]) if i in flipped else r for i, r in enumerate(rows)]
    b = _write(folder / "b.csv", rows)
    return {
        "A": (_write(folder / "a.csv", [r for i, r in enumerate(rows) if i not in dropped]), []),
        "B": (b, []),
        "C": (_write(folder / "c.csv", c_rows), []),
        "D": (b, ["dataset.split.seed=1"]),
    }


def _prepare(source: Path, root: Path, extra: list[str], epochs: int) -> experiment.Prepared:
    overrides = [
        f"dataset.source={source}",
        "dataset.id_column=id",
        f"storage.cache_root={root / 'cache'}",
        f"storage.runs_root={root / 'runs'}",
        f"storage.registry={root / 'registry.sqlite'}",
        f"train.epochs={epochs}",
        "train.device=cpu",
        *extra,
    ]
    return experiment.prepare(load_config(CONFIG, overrides))


def loader_throughput(work: Path, examples: int = 6000, passes: int = 3) -> dict[str, float]:
    """MB/s of one shuffled training epoch (CacheBatches) through a view over one segment vs over two
    (90% + an interleaved 10%, as B over A): synthetic fp16 rows, 3 layers x 384, ~30 tokens each."""
    import numpy as np
    import pyarrow as pa

    from unipt.pipeline.cache.layout import LayerSpec, StoreLayout
    from unipt.pipeline.cache.opener import open_cache
    from unipt.pipeline.cache.reader import CacheReader
    from unipt.pipeline.cache.root import CacheRoot
    from unipt.pipeline.cache.space import write_view
    from unipt.pipeline.cache.writer import CacheBuilder, write_shard
    from unipt.pipeline.config import TrainConfig
    from unipt.train.loader import CacheBatches

    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 50, examples).tolist()
    hashes = [f"{i:08d}" for i in range(examples)]
    space = "5a" * 16

    def segment(root: CacheRoot, seg: str, members: list[int]) -> None:
        layout = StoreLayout(tuple(LayerSpec(i, 384) for i in (0, 3, 6)), len(members), 64, shard_size=512)
        builder = CacheBuilder(root, seg, final=root.segment_location(space, seg))
        builder.create(layout, {"kind": "segment", "space_key": space, "key_fields": {}})
        for shard in layout.shards():
            part = [lengths[m] for m in members[shard.example_start : shard.example_stop]]
            rows = {i: rng.standard_normal((sum(part), 384)).astype(np.float16) for i in (0, 3, 6)}
            write_shard(builder.location, layout, shard, rows, part)
        builder.commit(layout, pa.table({"input_hash": [hashes[m] for m in members]}), {})

    table = pa.table(
        {"example_id": hashes, "label": [i % 2 for i in range(examples)], "split": ["train"] * examples}
    )
    rates: dict[str, list[float]] = {}
    every, tenth = list(range(examples)), list(range(0, examples, 10))
    for name, parts in (("one segment", [every]), ("two segments", [[i for i in every if i % 10], tenth])):
        root = CacheRoot(work / name.replace(" ", "-"))
        readers = {}
        for index, members in enumerate(parts):
            seg = f"{index + 1:02d}" * 16
            segment(root, seg, members)
            readers[seg] = CacheReader(root.segment_location(space, seg))
        where = {hashes[m]: (f"{i + 1:02d}" * 16, row) for i, members in enumerate(parts)
                 for row, m in enumerate(members)}  # fmt: skip
        write_view(
            root, "ee" * 16, {"key_fields": {}, "label_names": ["a", "b"]}, table, hashes, where, readers
        )
        view = open_cache(root.location("ee" * 16))
        config = TrainConfig()
        batches = CacheBatches.for_split(view, "train", config, seed=0, shuffle=True)
        nbytes = sum(lengths) * 384 * 2 * 3
        for epoch in range(passes):
            t0 = time.perf_counter()
            for _ in batches.epoch(epoch):
                pass
            rates.setdefault(name, []).append(nbytes / (time.perf_counter() - t0) / 1e6)
        batches.close()
    return {name: round(sorted(values)[len(values) // 2], 1) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="a seeded sample of the data (default: all)")
    parser.add_argument("--epochs", type=int, default=1, help="UniPT epochs for the B-vs-B comparison")
    parser.add_argument("--out", type=Path, default=RESULTS / "incremental.json")
    parser.add_argument("--loader", action="store_true", help="only the loader: one segment vs two")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="unipt-incremental-"))
    try:
        if args.loader:
            print(f"loader MB/s (median of 3 shuffled epochs): {loader_throughput(work)}")
            return
        versions = _versions(work, args.limit)
        shared = work / "shared"
        rows = []
        full_cache = None
        for name, (source, extra) in versions.items():
            prep = _prepare(source, shared, extra, args.epochs)
            t0 = time.perf_counter()
            result = experiment.extract(prep, progress=False)
            seconds = time.perf_counter() - t0
            result.release()
            stats = result.stats
            view = Location(shared / "cache").child(prep.key).size()
            rows.append(
                {
                    "version": name,
                    "examples": len(prep.dataset),
                    "inputs_extracted": result.examples,
                    "forward_s": round(float(stats.get("forward_s", 0.0)), 2),
                    "step_s": round(seconds, 2),
                    "bytes_written": int(result.bytes_written) + view,
                    "disk_total": Location(shared / "cache").size(),
                }
            )
        scratch_prep = _prepare(versions["B"][0], work / "scratch", [], args.epochs)
        with experiment.extract(scratch_prep, progress=False):
            full_cache = Location(work / "scratch" / "cache").size()
        incremental = experiment.train(_prepare(versions["B"][0], shared, [], args.epochs), progress=False)
        scratch = experiment.train(scratch_prep, progress=False)
        keep = ("test_acc", "test_f1", "val_acc", "val_f1", "best_epoch")
        same = all(incremental.metrics.get(k) == scratch.metrics.get(k) for k in keep)
        header = [
            "version",
            "examples",
            "inputs_extracted",
            "forward_s",
            "step_s",
            "bytes_written",
            "disk_total",
        ]
        print_table(header, [[row[c] for c in header] for row in rows])
        ratio = rows[-1]["disk_total"] / full_cache
        print(f"\ndisk for A+B+C+D: {ratio:.3f}x a single full cache of B ({full_cache:,} bytes)")
        print(f"B incremental: { ({k: incremental.metrics.get(k) for k in keep}) }")
        print(f"B scratch:     { ({k: scratch.metrics.get(k) for k in keep}) }  identical: {same}")
        write_report(
            args.out,
            {
                "machine": machine(),
                "limit": args.limit,
                "epochs": args.epochs,
                "rows": rows,
                "full_cache_bytes": full_cache,
                "disk_ratio": ratio,
                "b_incremental": {k: incremental.metrics.get(k) for k in keep},
                "b_scratch": {k: scratch.metrics.get(k) for k in keep},
                "metrics_identical": same,
            },
            header,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
