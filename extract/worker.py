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

import numpy as np
import torch

from unipt.extract.augment import augment_images
from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline.cache.layout import ShardSpec, StoreLayout
from unipt.pipeline.cache.writer import write_shard
from unipt.pipeline.cuda_support import no_cuda_cause
from unipt.pipeline.errors import UniptError
from unipt.pipeline.log import say
from unipt.pipeline.storage import Location

SHARDS_IN_FLIGHT = 2  # per actor: one in the forward pass, one being written


class ExtractionWorker:
    """Wrapped with ``ray.remote`` by the driver; one instance per GPU (or CPU slot)."""

    def __init__(self, spec: BackboneLoadSpec, num_threads: int) -> None:
        # Imported here, in the worker process: the driver that wraps this class stays free of transformers.
        from unipt.extract.backbones import load_backbone

        _check_gpu_usable(spec)
        torch.set_num_threads(max(1, num_threads))
        self.backbone = load_backbone(spec)
        self._forward = threading.Lock()
        self._batch_limit: int | None = None  # the batch that fit after a CUDA out-of-memory, if one did
        self._largest_fit = 0  # the largest batch a forward pass of this worker has completed with

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
        input by its hash (:mod:`unipt.pipeline.data.augment`): images are augmented here, texts by the
        backbone's
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
            encoded, used_batch = self._encode_fitting(
                shard.shard_id, inputs, layers, layout.max_length, batch_size, compute_dtype, options
            )
            t1 = time.perf_counter()
        _check_finite(shard, encoded.layers, encoded.lengths)
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
            "device": self.device,
            "batch_size": used_batch,
        }

    @property
    def device(self) -> str:
        """Where this worker's forward passes run (``cuda:0``, ``cpu``), as every shard reports it."""
        return str(getattr(self.backbone, "device", "cpu"))

    def _encode_fitting(
        self,
        shard_id: int,
        inputs: list,
        layers: list[int],
        max_length: int,
        batch_size: int,
        compute_dtype: str,
        options: dict[str, Any],
    ) -> tuple[Any, int]:
        """``encode`` the shard, halving the batch and retrying it on a CUDA out-of-memory (the batch size
        is not part of the cache key: any batch computes the same rows). The batch that fit is kept for
        this worker's later shards."""
        size = min(batch_size, self._batch_limit or batch_size)
        while True:
            try:
                encoded = self.backbone.encode(inputs, layers, max_length, size, compute_dtype, **options)
            except torch.OutOfMemoryError as exc:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # the failed batch's blocks, before the smaller one
                if size == 1:
                    fit = f"a batch of {self._largest_fit} fit before" if self._largest_fit else "none fit"
                    raise UniptError(
                        f"shard {shard_id} ran out of GPU memory ({self.device}) even with a batch of 1 "
                        f"({fit}); lower backbone.max_length or extract.shard_size, or use a GPU with more "
                        "memory"
                    ) from exc
                size //= 2
                say(f"shard {shard_id}: out of GPU memory; retrying with a batch of {size}")
                self._batch_limit = size
                continue
            self._largest_fit = max(self._largest_fit, size)
            return encoded, size


def _check_gpu_usable(spec: BackboneLoadSpec) -> None:
    """An actor Ray gave a GPU must be able to use it: never extract on the CPU silently instead."""
    import ray

    gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    if gpus and spec.device != "cpu" and not torch.cuda.is_available():
        raise UniptError(
            f"Ray gave this extraction worker GPU {', '.join(map(str, gpus))} but torch cannot use it: "
            f"{no_cuda_cause()}; install a CUDA build of torch that the driver supports (see `nvidia-smi`), "
            "or start Ray with --num-gpus 0 to extract on CPUs"
        )


def _check_finite(shard: ShardSpec, layers: dict[int, np.ndarray], lengths: list[int] | None) -> None:
    """Refuse to write a shard holding NaN or inf: a cache of them would train to a wrong number."""
    for layer, rows in layers.items():
        bad = ~np.isfinite(rows).all(axis=1)
        if not bad.any():
            continue
        row = int(np.argmax(bad))
        where = f"row {row}"
        if lengths:  # token rows: name the example
            example = int(np.searchsorted(np.cumsum(lengths), row, side="right"))
            where = f"example {shard.example_start + example}"
        raise UniptError(
            f"shard {shard.shard_id}: the backbone produced non-finite activations (NaN or inf) in layer "
            f"{layer} ({where}); nothing of this shard was written. Extract in full precision "
            "(extract.autocast: none) or check the model's weights"
        )
