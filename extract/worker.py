"""The extraction worker: a Ray actor that loads the backbone once and writes whole shards."""

from __future__ import annotations

import time

import torch

from extract.spec import BackboneLoadSpec
from pipeline.cache import ShardSpec, write_shard


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
        store_path: str,
        shard: ShardSpec,
        texts: list[str],
        layers: list[int],
        max_length: int,
        batch_size: int,
        dtype: str,
    ) -> dict:
        t0 = time.perf_counter()
        encoded = self.backbone.encode(texts, layers, max_length, batch_size, dtype)
        t1 = time.perf_counter()
        nbytes = write_shard(store_path, shard, encoded.layers, encoded.lengths)
        return {
            "shard_id": shard.shard_id,
            "examples": shard.num_examples,
            "tokens": int(sum(encoded.lengths)),
            "bytes": nbytes,
            "forward_s": t1 - t0,
            "write_s": time.perf_counter() - t1,
        }
