"""Cache size on disk per storage dtype, against the naive way of keeping activations: padded fp32 tensors.

The same examples (configs/rt_minilm.yaml: a seeded sample of Rotten Tomatoes through all-MiniLM-L6-v2,
every hidden state) are extracted once per dtype by the pipeline
(``unipt.pipeline.experiment.extract``, the
shipped codec), and each cache's bytes on disk are set against:

- **padded fp32**: ``N x max_length x hidden x layers x 4`` bytes, one dense float32 tensor per layer
  padded to ``backbone.max_length``: what saving the backbone's batched output would take;
- **padded to longest**: the same, padded only to the longest example;
- **ragged fp32**: only the real tokens, float32 (``tokens x hidden x layers x 4``).

"on disk" is every file of the cache (activations, int8 scales, offsets, example table, metadata);
"activations" is the layer arrays alone (and their scales). Writes benchmarks/results/cache_size.json
and .csv.

    python benchmarks/cache_size.py                                # 2,000 snippets, fp32/fp16/bf16/int8
    python benchmarks/cache_size.py --limit 300 --dtypes float16 int8   # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402, F401  (before Ray: see extract/runner.py)

from benchmarks.common import RESULTS, machine, print_table, write_report  # noqa: E402
from unipt.pipeline.cache.activation_cache import ActivationCache  # noqa: E402
from unipt.pipeline.cache.layout import layer_array_name, scale_array_name  # noqa: E402
from unipt.pipeline.cache.reader import CacheReader  # noqa: E402
from unipt.pipeline.cache.view import ViewReader  # noqa: E402
from unipt.pipeline.config import load_config  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16", "int8")
COLUMNS = (
    "dtype",
    "examples",
    "tokens",
    "layers",
    "hidden_total",
    "max_length",
    "longest",
    "bytes_on_disk",
    "activation_bytes",
    "padded_fp32_bytes",
    "padded_longest_fp32_bytes",
    "ragged_fp32_bytes",
    "disk_vs_padded_fp32",
    "disk_vs_padded_longest_fp32",
    "disk_vs_ragged_fp32",
    "bytes_per_value",
)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def activation_bytes(reader: CacheReader) -> int | None:
    """Bytes of the layer arrays and int8 scales; None for a remote store (only the total is cheap there)."""
    if not reader.location.is_local:
        return None
    root = Path(reader.location.url)
    names = [n for layer in reader.layers for n in (layer_array_name(layer), scale_array_name(layer))]
    return sum(_folder_bytes(root / name) for name in names)


def size_row(reader: ActivationCache, on_disk: int, activations: int | None) -> dict[str, Any]:
    """One cache's size against the fp32 layouts it replaces."""
    offsets = reader.offsets
    lengths = offsets[:, 1] - offsets[:, 0]
    examples, tokens, longest = len(lengths), int(lengths.sum()), int(lengths.max(initial=0))
    hidden = sum(reader.hidden_sizes[layer] for layer in reader.layers)  # layers x hidden, widths may differ
    max_length = reader.layout.max_length
    padded = examples * max_length * hidden * 4
    padded_longest = examples * longest * hidden * 4
    ragged = tokens * hidden * 4
    return {
        "dtype": reader.dtype,
        "examples": examples,
        "tokens": tokens,
        "layers": len(reader.layers),
        "hidden_total": hidden,
        "max_length": max_length,
        "longest": longest,
        "bytes_on_disk": on_disk,
        "activation_bytes": activations,
        "padded_fp32_bytes": padded,
        "padded_longest_fp32_bytes": padded_longest,
        "ragged_fp32_bytes": ragged,
        "disk_vs_padded_fp32": on_disk / padded,
        "disk_vs_padded_longest_fp32": on_disk / padded_longest,
        "disk_vs_ragged_fp32": on_disk / ragged,
        "bytes_per_value": (activations if activations is not None else on_disk) / (tokens * hidden),
    }


def print_rows(rows: list[dict[str, Any]]) -> None:
    mib = 2**20
    print_table(
        (
            "dtype",
            "on disk MiB",
            "padded fp32 MiB",
            "ragged fp32 MiB",
            "/padded",
            "/longest",
            "/ragged",
            "B/value",
        ),
        [
            (
                r["dtype"],
                f"{r['bytes_on_disk'] / mib:,.1f}",
                f"{r['padded_fp32_bytes'] / mib:,.1f}",
                f"{r['ragged_fp32_bytes'] / mib:,.1f}",
                f"{r['disk_vs_padded_fp32']:.3f}",
                f"{r['disk_vs_padded_longest_fp32']:.3f}",
                f"{r['disk_vs_ragged_fp32']:.3f}",
                f"{r['bytes_per_value']:.2f}",
            )
            for r in rows
        ],
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/rt_minilm.yaml")
    parser.add_argument("--limit", type=int, default=2000, help="dataset.limit: a seeded sample (0: all)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--cache-root", default=".unipt/cache")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default=str(RESULTS / "cache_size.json"))
    args = parser.parse_args()

    from unipt.pipeline import experiment

    rows, caches = [], {}
    for dtype in args.dtypes:
        overrides = [f"extract.dtype={dtype}"] + ([f"dataset.limit={args.limit}"] if args.limit else [])
        prep = experiment.prepare(
            load_config(args.config, [*overrides, f"storage.cache_root={args.cache_root}", *args.set])
        )
        experiment.extract(prep, progress=False)
        reader = experiment.open_for_training(prep)
        on_disk = reader.nbytes_on_disk()
        rows.append(
            size_row(
                reader,
                on_disk,
                activation_bytes(reader) if isinstance(reader, (CacheReader, ViewReader)) else None,
            )
        )
        caches[dtype] = {"key": prep.key, "path": reader.source}
    print_rows(rows)
    report = {
        "benchmark": "cache_size",
        "machine": machine(),
        "config": args.config,
        "settings": {
            "limit": args.limit,
            "dtypes": args.dtypes,
            "overrides": args.set,
            "cpus": os.cpu_count(),
        },
        "caches": caches,
        "rows": rows,
    }
    write_report(Path(args.out), report, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
