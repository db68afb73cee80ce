"""The extraction worker: a Ray actor that loads the backbone once and writes whole shards."""

from __future__ import annotations

import time

import torch

from extract.spec import BackboneLoadSpec
from pipeline.cache_layout import ShardSpec, StoreLayout
from pipeline.cache_writer import write_shard
from pipeline.storage import Location


class ExtractionWorker:
    """Wrapped with ``ray.remote`` by the driver; one instance per GPU (or CPU slot)."""

    def __init__(self, spec: BackboneLoadSpec, num_threads: int) -> None:
        # Imported here, in the worker process: the driver that wraps this class stays free of transformers.
        from extract.backbones import HFTextBackbone

        torch.set_num_threads(max(1, num_threads))
        self.backbone = HFTextBackbone(spec)

    def describe(self) -> dict:
        return self.backbone.describe()

    def run_shard(
        self,
        location: Location,
        layout: StoreLayout,
        shard: ShardSpec,
        texts: list[str],
        batch_size: int,
    ) -> dict:
        t0 = time.perf_counter()
        layers = [spec.index for spec in layout.layers]
        # fp16 stores take the fp16 output as is; the other dtypes are encoded from float32.
        compute_dtype = "float16" if layout.dtype == "float16" else "float32"
        encoded = self.backbone.encode(texts, layers, layout.max_length, batch_size, compute_dtype)
        t1 = time.perf_counter()
        nbytes = write_shard(location, layout, shard, encoded.layers, encoded.lengths)
        return {
            "shard_id": shard.shard_id,
            "examples": shard.num_examples,
            "tokens": int(sum(encoded.lengths)),
            "bytes": nbytes,
            "forward_s": t1 - t0,
            "write_s": time.perf_counter() - t1,
        }
