"""What checking every read costs: read + decode throughput with and without the crc32c chunk checksum.

The same rows are stored three ways and read the way training reads them (shuffled blocks of
``--block-rows`` contiguous rows, every row once per pass):

* ``format 2``  a plain Zarr array without the crc32c codec, read with Zarr (what format-2 reads did);
* ``crc32c``    the format-3 cache's array (crc32c last in the codec chain), read with Zarr directly:
               the codec's cost alone;
* ``format 3``  the same cache through :class:`unipt.pipeline.cache.reader.CacheReader` ``read_rows``: crc32c
plus the
               reader's per-chunk checks (trailer position, missing chunk), i.e. what training pays.

Each codec (default Blosc zstd 1, and ``none``, where decoding is cheapest and the checksum's share
largest) gets ``--passes`` passes per mode, the modes interleaved so drift in machine load hits all
three alike; medians are reported. Throughput is MB/s (1e6 bytes) of decoded rows, wall clock and
process CPU time (CPU time counts every thread's work and is less disturbed by other processes on
a shared machine). Reads come from the page cache (the worst case for the checksum's relative cost)
and, with the files evicted before each pass (``posix_fadvise(DONTNEED)``), from the disk.

Run:  python benchmarks/checksum_cost.py             (49,152 rows x 384 fp16, 21 passes; ~1 min on 2 cores)
      python benchmarks/checksum_cost.py --quick     (a smoke run)
Prints a table and writes benchmarks/results/checksum_cost.json (and .csv).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import zarr  # noqa: E402

from benchmarks.common import RESULTS, machine, print_table, write_report  # noqa: E402
from unipt.pipeline.cache.encoding import compressors, decode_rows  # noqa: E402
from unipt.pipeline.cache.layout import LayerSpec, StoreLayout, layer_array_name  # noqa: E402
from unipt.pipeline.cache.reader import CacheReader  # noqa: E402
from unipt.pipeline.cache.root import CacheRoot  # noqa: E402
from unipt.pipeline.cache.writer import CacheBuilder, write_shard  # noqa: E402

KEY = "c5" * 16
MODES = ("format 2", "crc32c", "format 3")


def build(
    where: Path, codec: str, rows: np.ndarray, tokens: int
) -> tuple[CacheReader, zarr.Array, zarr.Array]:
    """A real format-3 cache of ``rows`` (examples of ``tokens`` rows each), and the same rows in a plain
    array without crc32c; returns the reader, the cache's array opened by Zarr alone, and the plain one."""
    width = rows.shape[1]
    layout = StoreLayout(
        (LayerSpec(0, width),),
        num_examples=len(rows) // tokens,
        max_length=tokens,
        shard_size=512,
        codec=codec,
    )
    builder = CacheBuilder(CacheRoot(where), KEY)
    builder.create(layout, {"label_names": ["a", "b"], "key_fields": {}})
    for shard in layout.shards():
        part = rows[shard.example_start * tokens : shard.example_stop * tokens]
        write_shard(builder.location, layout, shard, {0: part}, [tokens] * shard.num_examples)
    n = layout.num_examples
    table = pa.table({"example_id": [str(i) for i in range(n)], "label": [0] * n, "split": ["train"] * n})
    builder.commit(layout, table, {})
    reader = CacheReader(where / KEY)
    cached = zarr.open_array(store=str(where / KEY / layer_array_name(0)), mode="r")
    plain = zarr.create_array(
        store=str(where / "plain"),
        shape=cached.shape,
        chunks=cached.chunks,
        dtype=cached.dtype,
        compressors=compressors(codec, "byte", 1, 2, 1 << 20, checksum=False),
        fill_value=0,
    )
    plain[:] = cached[:]
    return reader, cached, plain


def evict(folder: Path) -> None:
    """Drop ``folder``'s files from the page cache, so the next read comes from the disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def one_pass(
    read: Callable[[int, int], np.ndarray], blocks: list[tuple[int, int]], cold: Path | None
) -> tuple[float, float]:
    if cold is not None:
        evict(cold)
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    for start, stop in blocks:
        read(start, stop)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(
    codec: str, cold: bool, rows: np.ndarray, args: argparse.Namespace, rng: np.random.Generator
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="checksum-cost-") as tmp:
        reader, cached, plain = build(Path(tmp), codec, rows, args.tokens)
        os.sync()  # written pages must be on disk before they can be evicted (disk reads)
        readers = {
            "format 2": lambda a, b: decode_rows(plain[a:b], "float16"),
            "crc32c": lambda a, b: decode_rows(cached[a:b], "float16"),
            "format 3": lambda a, b: reader.read_rows(0, a, b),
        }
        np.testing.assert_array_equal(readers["format 3"](0, len(rows)), rows)  # the same rows every way
        np.testing.assert_array_equal(readers["format 2"](0, len(rows)), rows)
        starts = list(range(0, len(rows), args.block_rows))
        times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
        for repeat in range(args.passes + 1):
            order = rng.permutation(len(starts))
            blocks = [(starts[i], min(starts[i] + args.block_rows, len(rows))) for i in order]
            for mode in MODES if repeat % 2 == 0 else MODES[::-1]:  # alternate so no mode always goes first
                took = one_pass(readers[mode], blocks, Path(tmp) if cold else None)
                if repeat > 0:  # the first pass only warms caches
                    times[mode].append(took)
        reader.lease.release()
    megabytes = rows.nbytes / 1e6
    result: dict[str, Any] = {
        "codec": codec,
        "reads": "disk" if cold else "page cache",
        "megabytes": round(megabytes, 1),
        "passes": args.passes,
    }
    for mode in MODES:
        result[f"{mode} MB/s"] = round(megabytes / statistics.median(t[0] for t in times[mode]), 1)
        result[f"{mode} CPU MB/s"] = round(megabytes / statistics.median(t[1] for t in times[mode]), 1)
    for clock in ("", " CPU"):
        base = result[f"format 2{clock} MB/s"]
        result[f"crc32c / format 2{clock}"] = round(result[f"crc32c{clock} MB/s"] / base, 3)
        result[f"format 3 / format 2{clock}"] = round(result[f"format 3{clock} MB/s"] / base, 3)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=1536)
    parser.add_argument("--tokens", type=int, default=32, help="rows per example")
    parser.add_argument("--width", type=int, default=384, help="hidden size (MiniLM: 384)")
    parser.add_argument("--block-rows", type=int, default=6144, help="rows per training read (~192 examples)")
    parser.add_argument("--passes", type=int, default=21)
    parser.add_argument("--codecs", default="blosc-zstd,none")
    parser.add_argument(
        "--reads", default="page,disk", help="page: from the page cache; disk: files evicted before each pass"
    )
    parser.add_argument("--quick", action="store_true", help="a few passes over a small store")
    parser.add_argument("--out", type=Path, default=RESULTS / "checksum_cost.json")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.passes = 256, 3
    rng = np.random.default_rng(0)
    # Activations are close to incompressible; normal values in fp16 compress about as real ones do.
    rows = (rng.standard_normal((args.examples * args.tokens, args.width)) * 0.5).astype(np.float16)
    results = [
        measure(codec, reads == "disk", rows, args, rng)
        for reads in args.reads.split(",")
        for codec in args.codecs.split(",")
    ]

    host = machine()
    when = time.strftime("%Y-%m-%d")
    print(f"\n{when}  {host['platform']}, {host['cpus']} CPUs; medians of {args.passes} passes")
    print_table(
        ["reads", "codec", "format 2 MB/s", "crc32c MB/s", "format 3 MB/s", "crc/f2", "f3/f2", "f3/f2 CPU"],
        [
            [
                r["reads"], r["codec"], r["format 2 MB/s"], r["crc32c MB/s"], r["format 3 MB/s"],
                r["crc32c / format 2"], r["format 3 / format 2"], r["format 3 / format 2 CPU"],
            ]
            for r in results
        ],
    )  # fmt: skip
    report = {
        "what": "read+decode throughput of shuffled ~6k-row blocks: format 2 (no crc32c), the crc32c codec "
        "alone, and format 3 through CacheReader (crc32c + per-chunk position and presence checks)",
        "machine": host,
        "rows": results,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    columns = list(results[0])
    write_report(args.out, report, columns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
