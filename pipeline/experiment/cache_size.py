"""What a cache's size depends on besides its rows' compressed bytes: the inputs per example, the padding an
uncompressed store writes past its rows, and the worst case read from the backbone's config (no sample)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.cache.encoding import STORAGE_DTYPES, has_scale
from unipt.pipeline.cache.layout import resolve_chunk_rows
from unipt.pipeline.config import ExtractConfig
from unipt.pipeline.experiment.recipe import Prepared, PreparedBackbone

# What the files besides the layer arrays take per example: offsets (2 x int64), examples.parquet, metadata.
PER_EXAMPLE_OVERHEAD = 24


def inputs_per_example(prep: Prepared) -> float:
    """Backbone inputs per example: 1, plus ``extract.views - 1`` augmented views of each train example."""
    views = prep.config.extract.views
    if views == 1:
        return 1.0
    return 1 + (views - 1) * prep.dataset.split_counts()["train"] / max(1, len(prep.dataset))


def tail_padding_bytes(
    reader: ActivationCache, ext: ExtractConfig, tokens: int, examples: int
) -> dict[str, int]:
    """The bytes an uncompressed cache stores past its rows: each shard's last chunk of every array is
    written whole (compressors squeeze those zeros to nothing, so only ``codec: none`` pays them). Estimated
    from the mean rows per shard; 0 for every dtype under a compressor."""
    if ext.codec != "none":
        return dict.fromkeys(STORAGE_DTYPES, 0)
    widths = list(reader.hidden_sizes.values())
    chunk_rows = resolve_chunk_rows(ext.chunk_rows, widths)
    shards = max(1, -(-examples // ext.shard_size))
    rows = tokens / shards
    padded_rows = shards * (-(-rows // chunk_rows) * chunk_rows - rows)
    sizes = {}
    for dtype in STORAGE_DTYPES:
        itemsize = np.dtype(STORAGE_DTYPES[dtype]).itemsize
        scales = 4 * len(widths) if has_scale(dtype) else 0  # one float32 scale per row and layer
        sizes[dtype] = int(padded_rows * (itemsize * sum(widths) + scales))
    return sizes


def worst_case_bytes(prep: Prepared, target: PreparedBackbone) -> int | None:
    """Every example at ``max_length`` tokens, every value uncompressed: an upper bound read from the
    backbone's config.json (no backbone loaded). None when the shape is not there (bundled CNN, ...)."""
    try:
        meta = json.loads((Path(target.identity.local_dir) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    meta = meta.get("text_config", meta)
    width, depth = meta.get("hidden_size"), meta.get("num_hidden_layers")
    if not isinstance(width, int) or not isinstance(depth, int):
        return None
    layers = depth + 1 if target.config.layers == "all" else len(target.config.layers)
    dtype = prep.config.extract.dtype
    per_value = STORAGE_DTYPES[dtype].itemsize + (4 / width if has_scale(dtype) else 0)
    rows = len(prep.dataset) * target.config.max_length * inputs_per_example(prep)
    # Blosc adds a header per block; an incompressible chunk can grow by a few bytes per MiB: 1% covers it.
    return int(rows * layers * width * per_value * 1.01) + PER_EXAMPLE_OVERHEAD * len(prep.dataset)
