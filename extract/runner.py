"""The extraction driver: plan shards, run them on Ray actors, commit the cache.

The driver never imports ``transformers``: backbones live only in the worker processes,
which are gone when extraction returns, so a training step in the same process holds no
backbone in memory.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import RayError
from ray.util import ActorPool
from tqdm.auto import tqdm

from extract.spec import BackboneLoadSpec
from pipeline.cache import CacheRoot
from pipeline.cache_layout import LayerSpec, StoreLayout
from pipeline.cache_writer import CacheBuilder
from pipeline.config import BackboneConfig, ExtractConfig
from pipeline.errors import UniptError
from pipeline.locks import exclusive
from pipeline.storage import Location


@dataclass
class ExtractionRequest:
    key: str
    key_fields: dict[str, Any]
    cache_root: CacheRoot
    examples: pa.Table  # example_id, text, label, split
    label_names: list[str]
    load_spec: BackboneLoadSpec
    backbone: BackboneConfig
    extract: ExtractConfig
    backbone_name: str = ""


@dataclass
class ExtractionResult:
    path: Location
    cache_hit: bool
    seconds: float = 0.0
    examples: int = 0
    tokens: int = 0
    bytes_written: int = 0
    shards_run: int = 0
    shards_resumed: int = 0
    workers: int = 0
    stats: dict[str, float] = field(default_factory=dict)


def run_extraction(
    request: ExtractionRequest, ray_address: str | None = None, progress: bool = True
) -> ExtractionResult:
    root, key = request.cache_root, request.key
    if root.has(key):
        return ExtractionResult(path=root.location(key), cache_hit=True)
    if request.examples.num_rows == 0:
        raise UniptError("the dataset is empty after loading and filtering; nothing to extract")

    def waiting() -> None:
        print(
            f"unipt: another extraction of cache {key} is running; waiting for it",
            file=sys.stderr,
            flush=True,
        )

    t0 = time.perf_counter()
    with exclusive(root.lock_location(key), on_wait=waiting):
        if root.has(key):  # built by the run we waited for
            return ExtractionResult(path=root.location(key), cache_hit=True, seconds=time.perf_counter() - t0)
        published = CacheBuilder(root, key).publish_if_committed()
        if published is not None:
            return ExtractionResult(path=published, cache_hit=True)
        # torch before Ray: inside a `ray job` whose working_dir was just unpacked, importing torch
        # after ray.init() has crashed in oneMKL (seen with Ray 2.60); the other order is safe.
        import extract.worker  # noqa: F401

        started_ray = _ensure_ray(ray_address)
        try:
            return _extract(request, progress, t0)
        except RayError as exc:
            raise UniptError(
                f"extraction failed in a Ray worker: {_root_cause(exc)}; any finished shards are kept under "
                f"{root.partial_location(key)} and the same command resumes from them"
            ) from exc
        finally:
            if started_ray:
                ray.shutdown()


def _root_cause(exc: BaseException) -> str:
    """The innermost error's one-line message, without Ray's wrapping and traceback."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    # Stop at a UniptError: its message already says what is wrong and what to do.
    while (
        cause is not None
        and not isinstance(cause, UniptError)
        and (getattr(cause, "cause", None) or cause.__cause__) is not None
    ):
        cause = getattr(cause, "cause", None) or cause.__cause__
    message = str(cause or exc).strip().splitlines()
    if isinstance(cause, UniptError):
        return message[-1] if message else ""
    return f"{type(cause or exc).__name__}: {message[-1] if message else ''}"


def _warn_truncated(count: int, inputs: list, max_length: int) -> None:
    """One line for the whole extraction, not one per text or per shard."""
    lengths = [len(text) for text in inputs if isinstance(text, str)]
    longest = f" (the longest has {max(lengths):,} characters)" if lengths else ""
    print(
        f"unipt: warning: {count} text(s) longer than backbone.max_length ({max_length} tokens) were "
        f"truncated to it{longest}; raise backbone.max_length to keep more of each text",
        file=sys.stderr,
        flush=True,
    )


def _ensure_ray(address: str | None) -> bool:
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    return True


def _worker_layout(setting: int | str) -> tuple[int, dict[str, float], int]:
    """(worker count, Ray resources per worker, torch threads per worker).

    With GPUs: one worker per GPU by default. Without: one worker per node by default, each taking
    that many CPUs as the smallest node has, so every worker fits on some node of a mixed cluster.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = sum(int(n.get("GPU", 0)) for n in nodes)
    node_cpus = [int(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) >= 1] or [1]
    total_cpus = sum(node_cpus)
    if setting == "auto":
        count = gpus if gpus > 0 else len(node_cpus)
    else:
        count = int(setting)
    if gpus > 0:
        threads = max(1, total_cpus // max(count, 1))
        return count, {"num_gpus": 1, "num_cpus": 1}, threads
    per_worker = max(1, min(total_cpus // count, min(node_cpus) if setting == "auto" else max(node_cpus)))
    return count, {"num_cpus": per_worker}, per_worker


def _extract(request: ExtractionRequest, progress: bool, t0: float) -> ExtractionResult:
    from extract.worker import SHARDS_IN_FLIGHT, ExtractionWorker

    count, resources, threads = _worker_layout(request.extract.workers)
    # A worker that dies (OOM, preemption, kill -9) is restarted and its shard retried: writing a
    # shard is idempotent (same rows, marker last), so a retry cannot leave a torn shard behind.
    remote_worker = ray.remote(
        **resources, max_concurrency=SHARDS_IN_FLIGHT, max_restarts=3, max_task_retries=3
    )(ExtractionWorker)
    workers = [remote_worker.remote(request.load_spec, threads) for _ in range(count)]
    try:
        # Every actor has loaded its backbone once it answers: what comes after is the extraction proper.
        descriptions = ray.get([worker.describe.remote() for worker in workers])
        description = descriptions[0]
        ready_at = time.perf_counter()
        layers = _resolve_layers(request.backbone.layers, description["num_hidden_states"])
        hidden_sizes = {layer: int(description["hidden_sizes"][layer]) for layer in layers}
        grids = {int(k): tuple(v) for k, v in description.get("grids", {}).items()}
        input_column = description.get("input", "text")
        if input_column not in request.examples.column_names:
            have = "images" if "image" in request.examples.column_names else "texts"
            raise UniptError(
                f"backbone {request.backbone_name} reads {input_column}s but the dataset holds {have}; "
                "pair text backbones with text datasets and image backbones with image datasets"
            )

        examples = request.examples
        ext = request.extract
        # Images give every example the same token count (ViT: patches + CLS); reserve exactly that.
        max_length = int(description.get("tokens_per_example") or request.backbone.max_length)
        layout = StoreLayout(
            layers=tuple(LayerSpec(layer, hidden_sizes[layer], grids.get(layer)) for layer in layers),
            num_examples=examples.num_rows,
            max_length=max_length,
            shard_size=ext.shard_size,
            chunk_rows=ext.chunk_rows,
            dtype=ext.dtype,
            codec=ext.codec,
            shuffle=ext.shuffle,
            compression_level=ext.compression_level,
            blosc_blocksize=ext.blosc_blocksize,
            chunks_per_file=ext.chunks_per_file,
        )
        shards = layout.shards()
        builder = CacheBuilder(request.cache_root, request.key)
        fields = request.key_fields
        attrs = {
            "key_fields": fields,
            "dataset_fingerprint": fields["dataset_fingerprint"],
            "backbone": {"name": request.backbone_name, **fields["backbone"], **description},
            "tokenizer": {
                "class": description.get("tokenizer"),
                "sha256": fields["backbone"].get("tokenizer_sha256"),
            },
            "label_names": request.label_names,
        }
        builder.create(layout, attrs)
        finished = builder.finished_shards()
        todo = [s for s in shards if s.shard_id not in finished]
        inputs = examples.column(input_column).to_pylist()
        location = builder.location

        totals = {"tokens": 0, "bytes": 0, "raw_bytes": 0, "forward_s": 0.0, "write_s": 0.0, "truncated": 0}
        resumed_examples = sum(s.num_examples for s in shards if s.shard_id in finished)
        bar = tqdm(
            total=examples.num_rows,
            initial=resumed_examples,
            unit="ex",
            desc="extract",
            disable=not progress,
            dynamic_ncols=True,
        )
        pool = ActorPool(workers * SHARDS_IN_FLIGHT)  # each actor twice: see extract/worker.py
        jobs = pool.map_unordered(
            lambda actor, shard: actor.run_shard.remote(
                location,
                layout,
                shard,
                inputs[shard.example_start : shard.example_stop],
                request.backbone.batch_size,
            ),
            todo,
        )
        for stats in jobs:
            for name in totals:
                totals[name] += stats[name]
            bar.update(stats["examples"])
            bar.set_postfix(
                tokens=totals["tokens"], stored=f"{totals['bytes'] / 2**20:.0f}MiB", refresh=False
            )
        bar.close()
        if totals["truncated"]:
            _warn_truncated(int(totals["truncated"]), inputs, request.backbone.max_length)
        shards_done_at = time.perf_counter()

        metadata = examples.select(["example_id", "label", "split"])
        path = builder.commit(
            layout,
            metadata,
            {
                "extraction": {
                    "workers": count,
                    "shards": len(shards),
                    "forward_s": round(totals["forward_s"], 3),
                    "write_s": round(totals["write_s"], 3),
                }
            },
        )
        totals["startup_s"] = ready_at - t0  # Ray, actors, backbone loads (and lock waits)
        totals["shards_s"] = shards_done_at - ready_at
        totals["commit_s"] = time.perf_counter() - shards_done_at
    finally:
        for worker in workers:
            ray.kill(worker)
    return ExtractionResult(
        path=path,
        cache_hit=False,
        seconds=time.perf_counter() - t0,
        examples=examples.num_rows,
        tokens=totals["tokens"],
        bytes_written=totals["bytes"],
        shards_run=len(todo),
        shards_resumed=len(finished),
        workers=count,
        stats=totals,
    )


def _resolve_layers(layers: str | list[int], num_hidden_states: int) -> list[int]:
    if layers == "all":
        return list(range(num_hidden_states))
    bad = [layer for layer in layers if not 0 <= layer < num_hidden_states]
    if bad:
        raise UniptError(
            f"backbone.layers {bad} out of range: this backbone has hidden states "
            f"0..{num_hidden_states - 1}; set backbone.layers to indices in that range, or to all"
        )
    return list(layers)
