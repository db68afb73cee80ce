"""A new segment of an activation space: the inputs no segment holds, run through the backbone on Ray actors
(resuming from the shards a previous run finished), then committed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import ray
from tqdm.auto import tqdm

from unipt.extract.placement import say_none_ready, worker_layout
from unipt.extract.request import ExtractionRequest, ExtractionResult
from unipt.extract.worker_pool import WorkerPool
from unipt.pipeline.cache.identity import space_key_fields
from unipt.pipeline.cache.layout import SEGMENT_KIND, LayerSpec, ShardSpec, StoreLayout, resolve_chunk_rows
from unipt.pipeline.cache.writer import CacheBuilder
from unipt.pipeline.data.table import backbone_inputs
from unipt.pipeline.errors import UniptError
from unipt.pipeline.log import log, say
from unipt.pipeline.storage import Location

MAX_RESTARTS = 3  # Ray restarts a dead extraction actor this often (a new process, the backbone reloaded)


@dataclass
class ExtractionTotals:
    """What one extraction's shards added up to; ``ExtractionResult.stats`` holds it as a dict."""

    tokens: int = 0
    bytes: int = 0  # stored (compressed)
    raw_bytes: int = 0  # activations handed in (decoded)
    forward_s: float = 0.0  # summed over shards: the workers' backbone time
    write_s: float = 0.0  # summed over shards: overlapped with the next shard's forward pass
    truncated: int = 0  # texts cut to backbone.max_length
    no_content: list[int] = field(default_factory=list)  # positions of texts of only special/unknown tokens
    devices: list[str] = field(default_factory=list)  # where the shards' forward passes ran, sorted
    shards_requeued: int = 0
    startup_s: float = 0.0  # Ray, actors, backbone loads (and lock waits)
    shards_s: float = 0.0
    commit_s: float = 0.0

    def add_shard(self, stats: dict[str, Any]) -> None:
        """Add one shard's stats, as ``ExtractionWorker.run_shard`` returns them."""
        self.tokens += stats["tokens"]
        self.bytes += stats["bytes"]
        self.raw_bytes += stats["raw_bytes"]
        self.forward_s += stats["forward_s"]
        self.write_s += stats["write_s"]
        self.truncated += stats["truncated"]
        self.no_content += stats["no_content"]
        self.devices = sorted({*self.devices, stats["device"]})


def extract_segment(
    request: ExtractionRequest,
    examples: pa.Table,
    hashes: list[str],
    builder: CacheBuilder,
    space: str,
    progress: bool,
    t0: float,
    views: list[str | None] | None = None,
) -> ExtractionResult:
    """Extract ``examples`` (one per input no segment holds; ``hashes`` are their input hashes) into the
    new segment ``builder`` builds, resuming from its finished shards. ``views`` names, per example,
    the augmented view to extract of it (its input hash), or None for the input as is."""
    from unipt.extract.worker import SHARDS_IN_FLIGHT

    count, resources, threads = worker_layout(request.extract.workers)
    workers = _start_workers(request, count, resources, threads)
    try:
        pool = WorkerPool(
            workers, SHARDS_IN_FLIGHT, on_no_worker_ready=lambda: say_none_ready(count, resources)
        )
        # An actor has loaded its backbone once it answers: what comes after is the extraction proper.
        description = pool.first_description()
        ready_at = time.perf_counter()
        layout = _segment_layout(request, description, examples.num_rows)
        inputs = backbone_inputs(examples, _input_column(request, description, examples))
        builder.create(layout, _segment_attrs(request, space, description))
        shards = layout.shards()
        finished = builder.finished_shards()
        todo = [s for s in shards if s.shard_id not in finished]
        submit = _shard_submitter(request, builder.location, layout, inputs, views)
        totals = _run_shards(pool, todo, submit, examples.num_rows, progress)
        _say_how_workers_did(pool, count, ran_any=bool(todo))
        _warn_about_inputs(totals, request, inputs, examples)
        shards_done_at = time.perf_counter()
        path = _commit_segment(builder, layout, hashes, request, count, len(shards), totals)
        totals.startup_s = ready_at - t0
        totals.shards_s = shards_done_at - ready_at
        totals.commit_s = time.perf_counter() - shards_done_at
    finally:
        for worker in workers:
            ray.kill(worker)
    return ExtractionResult(
        path=path,
        cache_hit=False,
        seconds=time.perf_counter() - t0,
        examples=examples.num_rows,
        tokens=totals.tokens,
        bytes_written=totals.bytes,
        shards_run=len(todo),
        shards_resumed=len(finished),
        workers=count,
        workers_used=pool.workers_used,
        workers_lost=pool.workers_lost,
        stats=asdict(totals),
    )


def _start_workers(
    request: ExtractionRequest, count: int, resources: dict[str, float], threads: int
) -> list[Any]:
    """``count`` extraction actors, each loading the backbone with ``resources`` and ``threads``."""
    from unipt.extract.worker import SHARDS_IN_FLIGHT, ExtractionWorker

    # A worker whose process dies (OOM, preemption, kill -9, its node lost) is restarted by Ray; its
    # shards are retried by WorkerPool, on any actor that is alive (see there).
    remote_worker = ray.remote(
        **resources, max_concurrency=SHARDS_IN_FLIGHT, max_restarts=MAX_RESTARTS, max_task_retries=0
    )(ExtractionWorker)
    return [remote_worker.remote(request.load_spec, threads) for _ in range(count)]


def _input_column(request: ExtractionRequest, description: dict[str, Any], examples: pa.Table) -> str:
    """The column the backbone reads ("text" or "image"); the dataset must hold it."""
    input_column = description.get("input", "text")
    if input_column not in examples.column_names:
        have = "images" if "image" in examples.column_names else "texts"
        raise UniptError(
            f"backbone {request.backbone_name} reads {input_column}s but the dataset holds {have}; "
            "pair text backbones with text datasets and image backbones with image datasets"
        )
    return input_column


def _segment_layout(
    request: ExtractionRequest, description: dict[str, Any], num_examples: int
) -> StoreLayout:
    """The new segment's store layout: the layers asked for, sized as the loaded backbone describes them."""
    layers = _resolve_layers(request.backbone.layers, description["num_hidden_states"])
    hidden_sizes = {layer: int(description["hidden_sizes"][layer]) for layer in layers}
    grids = {int(k): tuple(v) for k, v in description.get("grids", {}).items()}
    ext = request.extract
    # Images give every example the same token count (ViT: patches + CLS); reserve exactly that.
    max_length = int(description.get("tokens_per_example") or request.backbone.max_length)
    return StoreLayout(
        layers=tuple(LayerSpec(layer, hidden_sizes[layer], grids.get(layer)) for layer in layers),
        num_examples=num_examples,
        max_length=max_length,
        shard_size=ext.shard_size,
        chunk_rows=resolve_chunk_rows(ext.chunk_rows, [hidden_sizes[layer] for layer in layers]),
        dtype=ext.dtype,
        codec=ext.codec,
        shuffle=ext.shuffle,
        compression_level=ext.compression_level,
        blosc_blocksize=ext.blosc_blocksize,
        chunks_per_file=ext.chunks_per_file,
    )


def _segment_attrs(request: ExtractionRequest, space: str, description: dict[str, Any]) -> dict[str, Any]:
    """A segment belongs to its space, not to a dataset version: no fingerprint, labels or splits."""
    fields = space_key_fields(request.key_fields)
    return {
        "kind": SEGMENT_KIND,
        "space_key": space,
        "key_fields": fields,
        "backbone": {"name": request.backbone_name, **fields["backbone"], **description},
        "tokenizer": {
            "class": description.get("tokenizer"),
            "sha256": fields["backbone"].get("tokenizer_sha256"),
        },
    }


def _shard_submitter(
    request: ExtractionRequest,
    location: Location,
    layout: StoreLayout,
    inputs: list,
    views: list[str | None] | None,
) -> Callable[[Any, ShardSpec], Any]:
    """``submit(actor, shard)``: start the shard on the actor, give its ObjectRef."""

    def submit(actor: Any, shard: ShardSpec) -> Any:
        return actor.run_shard.remote(
            location,
            layout,
            shard,
            inputs[shard.example_start : shard.example_stop],
            request.backbone.batch_size,
            None if views is None else views[shard.example_start : shard.example_stop],
        )

    return submit


def _run_shards(
    pool: WorkerPool,
    todo: list[ShardSpec],
    submit: Callable[[Any, ShardSpec], Any],
    num_examples: int,
    progress: bool,
) -> ExtractionTotals:
    """Run ``todo`` on the pool under a progress bar (the examples not in it resumed); what the shards
    added up to."""
    totals = ExtractionTotals()
    bar = tqdm(
        total=num_examples,
        initial=num_examples - sum(s.num_examples for s in todo),
        unit="ex",
        desc="extract",
        disable=not progress,
        dynamic_ncols=True,
    )

    def done(stats: dict[str, Any]) -> None:
        totals.add_shard(stats)
        bar.update(stats["examples"])
        bar.set_postfix(tokens=totals.tokens, stored=f"{totals.bytes / 2**20:.0f}MiB", refresh=False)

    pool.run(todo, submit, done)
    bar.close()
    totals.shards_requeued = pool.requeued
    return totals


def _say_how_workers_did(pool: WorkerPool, count: int, ran_any: bool) -> None:
    lost, idle = pool.workers_lost, pool.never_started
    if lost:
        say(
            f"lost {lost} of {count} workers; their shards were re-queued "
            f"({pool.requeued} shard(s) redone by the {count - lost} left)"
        )
    if idle and ran_any:
        # A worker whose node goes away while it loads the backbone leaves no error behind: Ray
        # restarts it somewhere, and where there is no room its first answer never comes.
        say(
            f"{idle} of {count} workers ran no shard: they never started (no room on the cluster, or "
            "their node was lost while they loaded the backbone) or the others finished first"
        )


def _warn_about_inputs(
    totals: ExtractionTotals, request: ExtractionRequest, inputs: list, examples: pa.Table
) -> None:
    if totals.devices:
        autocast = request.load_spec.autocast
        say(f"extraction ran on {', '.join(totals.devices)} (extract.autocast: {autocast})")
    if totals.truncated:
        _warn_truncated(totals.truncated, inputs, request.backbone.max_length)
    if totals.no_content:
        _warn_no_content(sorted(totals.no_content), examples.column("example_id").to_pylist())


def _commit_segment(
    builder: CacheBuilder,
    layout: StoreLayout,
    hashes: list[str],
    request: ExtractionRequest,
    workers: int,
    shards: int,
    totals: ExtractionTotals,
) -> Location:
    metadata = pa.table({"input_hash": pa.array(hashes, pa.string())})
    extraction = {
        "workers": workers,
        "shards": shards,
        "forward_s": round(totals.forward_s, 3),
        "write_s": round(totals.write_s, 3),
        # Where and in what precision the rows were computed: a CPU run cannot pass for a GPU one.
        "devices": totals.devices,
        "autocast": request.load_spec.autocast,
        "compute_dtype": "float16" if layout.dtype == "float16" else "float32",
    }
    return builder.commit(layout, metadata, {"extraction": extraction})


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


def _warn_truncated(count: int, inputs: list, max_length: int) -> None:
    """One line for the whole extraction, not one per text or per shard."""
    lengths = [len(text) for text in inputs if isinstance(text, str)]
    longest = f" (the longest has {max(lengths):,} characters)" if lengths else ""
    log.warning(
        f"warning: {count} text(s) longer than backbone.max_length ({max_length} tokens) were "
        f"truncated to it{longest}; raise backbone.max_length to keep more of each text"
    )


def _warn_no_content(positions: list[int], ids: list[str]) -> None:
    """One line for texts the tokenizer turns into nothing but special or unknown tokens (emoji-only or
    zero-width text): the model sees no content in them, yet they are trained and scored like the rest."""
    shown = ", ".join(repr(ids[p]) for p in positions[:3]) + (", ..." if len(positions) > 3 else "")
    log.warning(
        f"warning: {len(positions)} text(s) tokenize to nothing but special or unknown tokens "
        f"(e.g. emoji-only or zero-width text; ids {shown}); the model sees no content in them: clean or "
        "drop them, or use a backbone whose vocabulary covers them"
    )
