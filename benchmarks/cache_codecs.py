"""Benchmark Zarr v3 codecs and chunk sizes for the activation cache, on real MiniLM activations.

What it measures: for each layout (compressor, chunk_rows, sharding on/off, stored dtype) it writes
the per-layer activations of real Rotten Tomatoes snippets (bundled MiniLM, layers 0/3/6 by
default) as 2-D Zarr v3 arrays ``[total_tokens, hidden]`` chunked along rows, like
``pipeline/cache/writer.py`` does, into a LocalStore under a temp dir, then reports medians over
``--reps`` writes (and ``--read-passes`` read passes after each write) of:

* ratio      uncompressed bytes / bytes of all files in the store (also per layer);
* B/elem     bytes on disk per activation element (dtype-neutral: raw fp16 is 2.00);
* files      number of files in the store (matters for S3 and shared filesystems);
* write      MB/s of create + write of every layer;
* seq read   MB/s of reading each layer whole (``arr[:]``);
* block read MB/s of one training epoch's reads: blocks of ``--block-examples`` consecutive
             examples (contiguous row ranges), in shuffled order, every layer per block;
* modeled    block-read MB/s if the bytes also had to come from storage at ``--storage-mbps``
             (time = storage time of the compressed bytes + measured decode time), a proxy
             for a cold read from a shared filesystem or object store.

All throughputs are MB/s (1e6 bytes) of decoded, uncompressed bytes. Reads are served from the
page cache (the store was just written) unless ``--cold``, which evicts the files with
``posix_fadvise(DONTNEED)`` first; so read MB/s is decode + Zarr overhead, not disk speed.

Stages: (1) every compressor at ``--chunk-rows`` (4096), fp16, no sharding: zstd 1/3 and lz4
alone, Blosc zstd/lz4 with byte shuffle or bitshuffle at Blosc's automatic block size, and
Blosc zstd + shuffle with an explicit 1 MiB / 4 MiB block size (``-1M``/``-4M``); (2) the best
``--top`` compressors by the modeled throughput at 1024 / 16384 rows and with sharding
(``--shard-chunks`` inner chunks per shard file); (3) float32, bf16 (uint16 bits, round to
nearest even) and int8 (+ a float32 scale per token) for the best 2 compressors.

Run:  python benchmarks/cache_codecs.py            (2000 examples, 3 reps, ~3 min on 2 cores)
      python benchmarks/cache_codecs.py --quick    (200 examples, 1 rep, < 30 s)
Writes the table to stdout and JSON to benchmarks/results/cache_codecs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numcodecs  # noqa: E402
import numcodecs.blosc  # noqa: E402
import zarr  # noqa: E402
from zarr.codecs import BloscCodec, ZstdCodec  # noqa: E402
from zarr.codecs.numcodecs import LZ4  # noqa: E402

from unipt.pipeline.cache.encoding import decode_rows, encode_rows  # noqa: E402

warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

MB = 1e6
MIB = 1 << 20
CURRENT_DEFAULT = "blosc-zstd1-shuffle-1M"  # what pipeline/cache/encoding.py ships (chosen from this table)

# name -> factory for the `compressors=` argument of create_array (None = stored raw).
COMPRESSORS: dict[str, Callable[[], list[Any] | None]] = {
    "none": lambda: None,
    "zstd1": lambda: [ZstdCodec(level=1)],
    "zstd3": lambda: [ZstdCodec(level=3)],
    "lz4": lambda: [LZ4(acceleration=1)],
    "blosc-zstd1-shuffle": lambda: [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")],
    "blosc-zstd3-shuffle": lambda: [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
    "blosc-zstd1-bitshuffle": lambda: [BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")],
    "blosc-zstd3-bitshuffle": lambda: [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")],
    "blosc-lz4-5-shuffle": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
    "blosc-lz4-5-bitshuffle": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
    # Blosc compresses each internal block on its own, and its automatic block size is small
    # (tens of KiB); bigger blocks let zstd see the repeated exponent bytes (and repeated rows).
    "blosc-zstd1-shuffle-1M": lambda: [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", blocksize=MIB)],
    "blosc-zstd3-shuffle-1M": lambda: [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", blocksize=MIB)],
    "blosc-zstd3-bitshuffle-1M": lambda: [
        BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", blocksize=MIB)
    ],
    "blosc-zstd3-shuffle-4M": lambda: [
        BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", blocksize=4 * MIB)
    ],
}


@dataclass(frozen=True)
class Layout:
    stage: int
    compressor: str
    chunk_rows: int
    sharded: bool
    dtype: str  # float16 | float32 | bfloat16 | int8


@dataclass
class Result:
    layout: Layout
    uncompressed_bytes: int
    disk_bytes: int
    files: int
    elements: int
    ratio_per_layer: dict[int, float]
    write_s: list[float] = field(default_factory=list)
    seq_read_s: list[float] = field(default_factory=list)
    block_read_s: list[float] = field(default_factory=list)
    rel_rms_error: float | None = None
    codecs: Any = None

    @property
    def ratio(self) -> float:
        return self.uncompressed_bytes / self.disk_bytes

    def mbps(self, times: list[float]) -> float:
        return self.uncompressed_bytes / MB / statistics.median(times)

    def modeled_mbps(self, storage_mbps: float) -> float:
        """Block-read MB/s if the compressed bytes also had to be fetched at storage_mbps."""
        decode_s = statistics.median(self.block_read_s)
        fetch_s = self.disk_bytes / MB / storage_mbps
        return self.uncompressed_bytes / MB / (decode_s + fetch_s)


def stored_arrays(layers: dict[int, np.ndarray], dtype: str) -> tuple[dict[str, np.ndarray], float]:
    """Arrays to write for one stored dtype (name -> array) and their relative RMS error vs float32.

    Uses the pipeline's own encoder, so the benchmark measures exactly what extraction stores.
    """
    arrays: dict[str, np.ndarray] = {}
    err_sq, ref_sq = 0.0, 0.0
    for layer, x in layers.items():
        stored, scale = encode_rows(x, dtype)
        arrays[f"layer_{layer:02d}"] = stored
        if scale is not None:
            arrays[f"layer_{layer:02d}_scale"] = scale
        approx = decode_rows(stored, dtype, scale)
        err_sq += float(np.sum((approx.astype(np.float64) - x) ** 2))
        ref_sq += float(np.sum(x.astype(np.float64) ** 2))
    return arrays, (err_sq / ref_sq) ** 0.5


def store_stats(path: Path) -> tuple[int, int, dict[str, int]]:
    """Total bytes, file count, and bytes per top-level array directory."""
    total, files, per_array = 0, 0, {}
    for f in path.rglob("*"):
        if f.is_file():
            size = f.stat().st_size
            total += size
            files += 1
            top = f.relative_to(path).parts[0]
            per_array[top] = per_array.get(top, 0) + size
    return total, files, per_array


def evict(path: Path) -> None:
    """Drop the store's files from the page cache (flushes them first)."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def write_store(path: Path, arrays: dict[str, np.ndarray], layout: Layout, shard_chunks: int) -> None:
    group = zarr.open_group(zarr.storage.LocalStore(path), mode="w", zarr_format=3)
    for name, data in arrays.items():
        chunks = (layout.chunk_rows,) + data.shape[1:]
        shards = (layout.chunk_rows * shard_chunks,) + data.shape[1:] if layout.sharded else None
        arr = group.create_array(
            name=name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunks,
            shards=shards,
            compressors=COMPRESSORS[layout.compressor](),
            fill_value=0,
        )
        arr[:] = data


def run_layout(
    layout: Layout,
    layers: dict[int, np.ndarray],
    blocks: list[tuple[int, int]],
    args: argparse.Namespace,
    workdir: Path,
) -> Result:
    arrays, rel_err = stored_arrays(layers, layout.dtype)
    uncompressed = sum(a.nbytes for a in arrays.values())
    elements = sum(x.size for x in layers.values())
    result: Result | None = None
    for rep in range(args.reps):
        path = workdir / f"store_{rep}"
        t0 = time.perf_counter()
        write_store(path, arrays, layout, args.shard_chunks)
        write_s = time.perf_counter() - t0
        group = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")
        handles = {name: group[name] for name in arrays}

        seq_times, block_times = [], []
        for read_pass in range(args.read_passes):
            if args.cold:
                evict(path)
            t0 = time.perf_counter()
            full = {name: h[:] for name, h in handles.items()}
            seq_times.append(time.perf_counter() - t0)
            if rep == 0 and read_pass == 0:
                for name, data in arrays.items():
                    if not np.array_equal(full[name], data):
                        raise AssertionError(f"{layout}: {name} did not round-trip")
            del full

            if args.cold:
                evict(path)
            # A fresh shuffled block order per pass, the same sequence for every layout.
            order = np.random.default_rng([args.seed, rep, read_pass]).permutation(len(blocks))
            t0 = time.perf_counter()
            for i in order:
                start, stop = blocks[i]
                for h in handles.values():
                    h[start:stop]
            block_times.append(time.perf_counter() - t0)

        if result is None:
            codecs = next(iter(handles.values())).metadata.to_dict()["codecs"]
            disk, files, per_array = store_stats(path)
            ratio_per_layer = {}
            for layer in layers:
                names = [n for n in arrays if n.startswith(f"layer_{layer:02d}")]
                raw = sum(arrays[n].nbytes for n in names)
                ratio_per_layer[layer] = raw / sum(per_array[n] for n in names)
            result = Result(
                layout=layout,
                uncompressed_bytes=uncompressed,
                disk_bytes=disk,
                files=files,
                elements=elements,
                ratio_per_layer=ratio_per_layer,
                rel_rms_error=rel_err,
                codecs=json.loads(json.dumps(codecs, default=str)),
            )
        result.write_s.append(write_s)
        result.seq_read_s += seq_times
        result.block_read_s += block_times
        shutil.rmtree(path)
    assert result is not None
    return result


def extract_activations(args: argparse.Namespace) -> tuple[dict[int, np.ndarray], list[int]]:
    """Real float32 MiniLM hidden states of Rotten Tomatoes snippets, packed [tokens, hidden] per layer."""
    from unipt.extract.backbones import HFTextBackbone
    from unipt.extract.spec import BackboneLoadSpec
    from unipt.pipeline.config import DatasetConfig
    from unipt.pipeline.data.table import load_dataset

    ds = load_dataset(DatasetConfig(source="bundled:rotten_tomatoes", limit=args.examples))
    texts = ds.table.column("text").to_pylist()
    bb = HFTextBackbone(BackboneLoadSpec("bundled:all-minilm-l6-v2", None, False, "cpu"))
    enc = bb.encode(texts, layers=args.layers, max_length=args.max_length, batch_size=64, dtype="float32")
    return enc.layers, enc.lengths


def training_blocks(lengths: list[int], block_examples: int, rows: int) -> list[tuple[int, int]]:
    """Row ranges of runs of block_examples consecutive examples (as the training loader reads them),
    clipped to the first ``rows`` rows."""
    bounds = np.minimum(np.concatenate([[0], np.cumsum(lengths)]), rows)
    blocks = [
        (int(bounds[i]), int(bounds[min(i + block_examples, len(lengths))]))
        for i in range(0, len(lengths), block_examples)
    ]
    return [(a, b) for a, b in blocks if b > a]


def whole_chunk_rows(tokens: int, unit: int) -> int:
    """Largest multiple of ``unit`` rows <= tokens (all tokens if fewer than one unit).

    Zarr stores an edge chunk at full size, so a ragged tail would count padding against the
    uncompressed codec and differently for every chunk size; trimming keeps ratios comparable.
    """
    return (tokens // unit) * unit or tokens


def result_row(r: Result, storage_mbps: float) -> dict[str, Any]:
    lay = r.layout
    return {
        "stage": lay.stage,
        "compressor": lay.compressor,
        "dtype": lay.dtype,
        "chunk_rows": lay.chunk_rows,
        "sharded": lay.sharded,
        "ratio": round(r.ratio, 4),
        "ratio_per_layer": {str(k): round(v, 4) for k, v in r.ratio_per_layer.items()},
        "bytes_per_element": round(r.disk_bytes / r.elements, 4),
        "uncompressed_bytes": r.uncompressed_bytes,
        "disk_bytes": r.disk_bytes,
        "files": r.files,
        "write_mbps": round(r.mbps(r.write_s), 1),
        "seq_read_mbps": round(r.mbps(r.seq_read_s), 1),
        "block_read_mbps": round(r.mbps(r.block_read_s), 1),
        "modeled_block_read_mbps": round(r.modeled_mbps(storage_mbps), 1),
        "rel_rms_error_vs_float32": r.rel_rms_error,
        "zarr_codecs": r.codecs,
        "write_s": r.write_s,
        "seq_read_s": r.seq_read_s,
        "block_read_s": r.block_read_s,
    }


def format_table(results: list[Result], layers: list[int], storage_mbps: float) -> str:
    header = ["stage", "compressor", "dtype", "chunk", "shard", "ratio"]
    header += [f"L{layer}" for layer in layers]
    header += ["B/elem", "files", "write", "seq rd", "blk rd", f"@{storage_mbps:g}"]
    rows = []
    for r in results:
        lay = r.layout
        name = lay.compressor + (" *" if lay.compressor == CURRENT_DEFAULT else "")
        row = [str(lay.stage), name, lay.dtype, str(lay.chunk_rows), "yes" if lay.sharded else "no"]
        row += [f"{r.ratio:.3f}"] + [f"{r.ratio_per_layer[layer]:.3f}" for layer in layers]
        row += [f"{r.disk_bytes / r.elements:.3f}", str(r.files)]
        row += [f"{r.mbps(t):.0f}" for t in (r.write_s, r.seq_read_s, r.block_read_s)]
        row += [f"{r.modeled_mbps(storage_mbps):.0f}"]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    left = {1, 2}

    def fmt(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in pairs)

    lines = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "blosc_nthreads": numcodecs.blosc.get_nthreads(),
        "zarr_async_concurrency": zarr.config.get("async.concurrency"),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=2000, help="Rotten Tomatoes snippets to encode")
    p.add_argument("--layers", type=int, nargs="+", default=[0, 3, 6], help="hidden states to store")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--reps", type=int, default=3, help="writes per layout (medians are reported)")
    p.add_argument("--read-passes", type=int, default=3, help="read passes per write (medians over all)")
    p.add_argument("--chunk-rows", type=int, default=4096, help="chunk rows of the stage-1 codec matrix")
    p.add_argument("--chunk-variants", type=int, nargs="+", default=[1024, 16384])
    p.add_argument("--shard-chunks", type=int, default=16, help="inner chunks per shard file")
    p.add_argument("--top", type=int, default=3, help="compressors carried into the chunk/shard stage")
    p.add_argument("--block-examples", type=int, default=256, help="examples per training read block")
    p.add_argument("--storage-mbps", type=float, default=300.0, help="storage bandwidth of the model")
    p.add_argument("--dtype-codecs", nargs="+", default=None, help="compressors for stage 3 (default: top 2)")
    p.add_argument("--cold", action="store_true", help="evict the store from the page cache before reads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="200 examples, 1 rep, fewer layouts (smoke test)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.quick:
        args.examples, args.reps, args.read_passes, args.top = 200, 1, 1, 1
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / f"cache_codecs{'_quick' if args.quick else ''}.json"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    layers, lengths = extract_activations(args)
    extracted = sum(lengths)
    unit = args.chunk_rows if args.quick else max(args.chunk_rows, *args.chunk_variants)
    tokens = whole_chunk_rows(extracted, unit)
    layers = {layer: np.ascontiguousarray(x[:tokens]) for layer, x in layers.items()}
    blocks = training_blocks(lengths, args.block_examples, tokens)
    print(
        f"{args.examples} examples, {extracted} tokens, {tokens} kept (a multiple of {unit} rows); "
        f"layers {args.layers}; {len(blocks)} blocks of {args.block_examples} examples "
        f"(~{tokens // len(blocks)} rows); fp16 {sum(x.size for x in layers.values()) * 2 / MB:.1f} MB; "
        f"extraction {time.perf_counter() - t_start:.1f}s",
        flush=True,
    )

    results: list[Result] = []
    workdir = Path(tempfile.mkdtemp(prefix="cache_codecs_"))
    try:
        # Warm-up (thread pools, codec and sharding code paths), not recorded.
        warm_rows = min(tokens, 2 * args.chunk_rows)
        warm = {layer: x[:warm_rows] for layer, x in layers.items()}
        warm_args = argparse.Namespace(**{**vars(args), "reps": 1, "cold": False})
        for name in ["blosc-zstd3-shuffle", "zstd3", "lz4"]:
            layout = Layout(0, name, args.chunk_rows, True, "float16")
            run_layout(layout, warm, [(0, warm_rows)], warm_args, workdir)

        def run(layout: Layout) -> Result:
            r = run_layout(layout, layers, blocks, args, workdir)
            results.append(r)
            print(
                f"  {layout.compressor:24s} {layout.dtype:8s} {layout.chunk_rows:6d} "
                f"{'shard' if layout.sharded else '     '} ratio {r.ratio:.3f} "
                f"blk {r.mbps(r.block_read_s):.0f} MB/s",
                flush=True,
            )
            return r

        stage1 = [run(Layout(1, name, args.chunk_rows, False, "float16")) for name in COMPRESSORS]
        ranked = sorted(
            (r for r in stage1 if r.layout.compressor != "none"),
            key=lambda r: r.modeled_mbps(args.storage_mbps),
            reverse=True,
        )
        top = [r.layout.compressor for r in ranked[: args.top]]
        variants = [(rows, False) for rows in args.chunk_variants]
        variants += [(rows, True) for rows in sorted({*args.chunk_variants, args.chunk_rows})]
        if args.quick:
            variants = [(args.chunk_rows, True)]
        for name in top:
            for rows, sharded in variants:
                run(Layout(2, name, rows, sharded, "float16"))
        dtype_codecs = args.dtype_codecs or [r.layout.compressor for r in ranked[: 1 if args.quick else 2]]
        for name in dtype_codecs:
            for dtype in ["float32", "bfloat16", "int8"]:
                run(Layout(3, name, args.chunk_rows, False, dtype))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    table = format_table(results, args.layers, args.storage_mbps)
    print()
    print(table)
    print(
        f"\nMB/s of decoded bytes, median of {args.reps} writes, "
        f"{args.reps * args.read_passes} read passes; reads "
        f"{'cold (posix_fadvise DONTNEED)' if args.cold else 'from the page cache'}; "
        f"'@{args.storage_mbps:g}' = block read if bytes came from {args.storage_mbps:g} MB/s storage; "
        f"* = current default. Total {time.perf_counter() - t_start:.0f}s."
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "cache_codecs",
        "machine": machine_info(),
        "parameters": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "dtype_codecs"
        }
        | {"dtype_codecs": dtype_codecs, "top_compressors": top, "current_default": CURRENT_DEFAULT},
        "data": {
            "dataset": "bundled:rotten_tomatoes",
            "backbone": "bundled:all-minilm-l6-v2",
            "tokens_extracted": int(extracted),
            "tokens": int(tokens),
            "hidden": {str(k): int(v.shape[1]) for k, v in layers.items()},
            "blocks": len(blocks),
        },
        "notes": (
            "ratio = uncompressed bytes / bytes of all files in the LocalStore; throughputs are MB/s "
            "(1e6 B) of decoded bytes, medians over reps; reads are from the page cache unless cold; "
            "modeled = uncompressed / (block decode time + disk bytes / storage_mbps)."
        ),
        "rows": [result_row(r, args.storage_mbps) for r in results],
        "table": table,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
