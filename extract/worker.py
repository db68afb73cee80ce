"""The extraction worker: a Ray actor that loads the backbone once and writes whole shards.

The driver runs each actor with two shards in flight (``max_concurrency=2``). A lock lets only
one of them run the backbone at a time; the other is writing its finished shard meanwhile, so
encoding, compression and storage I/O of shard N overlap the forward pass of shard N+1 instead
of leaving the GPU (or the CPU's math threads) idle.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from extract.augment import augment_images
from extract.spec import BackboneLoadSpec
from pipeline.cache_layout import ShardSpec, StoreLayout
from pipeline.cache_writer import write_shard
from pipeline.storage import Location

SHARDS_IN_FLIGHT = 2  # per actor: one in the forward pass, one being written


class ExtractionWorker:
    """Wrapped with ``ray.remote`` by the driver; one instance per GPU (or CPU slot)."""

    def __init__(self, spec: BackboneLoadSpec, num_threads: int) -> None:
        # Imported here, in the worker process: the driver that wraps this class stays free of transformers.
        from extract.backbones import load_backbone

        torch.set_num_threads(max(1, num_threads))
        self.backbone = load_backbone(spec)
        self._forward = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return self.backbone.describe()

    def run_shard(
        self,
        location: Location,
        layout: StoreLayout,
        shard: ShardSpec,
        inputs: list,
        batch_size: int,
        views: list[str | None] | None = None,
    ) -> dict[str, Any]:
        """Encode and write one shard. ``views`` (one per input, or None) names the augmented view of an
        input by its hash (:mod:`pipeline.augment`): images are augmented here, texts by the backbone's
        tokenizer-level noise."""
        layers = [spec.index for spec in layout.layers]
        options: dict[str, Any] = {}
        if views is not None and any(view is not None for view in views):
            if self.backbone.input_kind == "image":
                inputs = augment_images(inputs, views)
            else:
                options["token_noise"] = views
        # fp16 stores take the fp16 output as is; the other dtypes are encoded from float32.
        compute_dtype = "float16" if layout.dtype == "float16" else "float32"
        waited = time.perf_counter()
        with self._forward:
            t0 = time.perf_counter()
            encoded = self.backbone.encode(
                inputs, layers, layout.max_length, batch_size, compute_dtype, **options
            )
            t1 = time.perf_counter()
        lengths = encoded.lengths if any(spec.grid is None for spec in layout.layers) else None
        first = layout.layers[0].index
        written = write_shard(location, layout, shard, encoded.layers, lengths)
        return {
            "shard_id": shard.shard_id,
            "examples": shard.num_examples,
            "tokens": int(encoded.layers[first].shape[0]),  # rows of the first layer (H*W each for maps)
            "bytes": written.stored_bytes,
            "raw_bytes": written.raw_bytes,
            "forward_s": t1 - t0,
            "write_s": time.perf_counter() - t1,
            "wait_s": t0 - waited,
            "truncated": encoded.truncated,
            "no_content": [shard.example_start + i for i in encoded.no_content],
        }
