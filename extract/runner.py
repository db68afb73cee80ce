"""The extraction driver: plan shards, run them on Ray actors, commit the cache.

The driver never imports ``transformers``: backbones live only in the worker processes, which are gone when
extraction returns, so a training step in the same process holds no backbone in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import RayError
from tqdm.auto import tqdm

from unipt.extract.ray_session import HeadWatch, connect, root_cause, same_command
from unipt.extract.spec import BackboneLoadSpec
from unipt.extract.worker_pool import WorkerPool
from unipt.pipeline.cache.identity import space_key, space_key_fields
from unipt.pipeline.cache.layout import (
    SEGMENT_KIND,
    VIEW_KIND,
    LayerSpec,
    ShardSpec,
    StoreLayout,
    resolve_chunk_rows,
)
from unipt.pipeline.cache.locks import LeaseSet, ReadLease, exclusive
from unipt.pipeline.cache.reader import CacheReader
from unipt.pipeline.cache.root import CacheRoot, is_complete, read_attrs
from unipt.pipeline.cache.space import (
    SpacePlan,
    plan_layer_subset,
    plan_space,
    segment_id,
    write_space_file,
    write_view,
)
from unipt.pipeline.cache.writer import CacheBuilder
from unipt.pipeline.config import BackboneConfig, ExtractConfig
from unipt.pipeline.data.augment import augmented_hashes
from unipt.pipeline.data.table import TEXT_PAIR_COLUMN, backbone_inputs, input_hashes
from unipt.pipeline.errors import UniptError
from unipt.pipeline.log import log, say
from unipt.pipeline.storage import Location


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
    """What one extraction (or cache hit) gave. It holds a read lease on the cache, taken before the
    build lock was let go (or, on a hit, before the cache was found), so `unipt cache gc` cannot remove
    the cache between here and training. Release it when done reading: ``result.release()``, or use the
    result as a context manager (``with run_extraction(...) as result: train(...)``)."""

    path: Location
    cache_hit: bool
    seconds: float = 0.0
    examples: int = 0
    tokens: int = 0
    bytes_written: int = 0
    shards_run: int = 0
    shards_resumed: int = 0
    workers: int = 0  # the actors started (extract.workers, cut to what the cluster could place)
    workers_used: int = 0  # of those, the ones that finished at least one shard
    workers_lost: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    lease: ReadLease | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """Let `unipt cache gc` remove this cache again (once no other reader holds it)."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def __enter__(self) -> ExtractionResult:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def run_extraction(
    request: ExtractionRequest, ray_address: str | None = None, progress: bool = True
) -> ExtractionResult:
    """Find or build the dataset version's view (``request.key``) over its activation space, extracting
    only the inputs no segment of the space holds; the result holds read leases on the view and its
    segments."""
    root, key = request.cache_root, request.key
    t0 = time.perf_counter()
    hit = _leased_view(root, key)
    if hit is not None:
        return ExtractionResult(path=root.location(key), cache_hit=True, lease=hit)
    if request.examples.num_rows == 0:
        raise UniptError("the dataset is empty after loading and filtering; nothing to extract")
    space = space_key(request.key_fields)
    hashes = input_hashes(request.examples)
    # Augmented views (extract.views > 1) are inputs of their own, planned and extracted with the rest.
    splits = request.examples.column("split").to_pylist()
    extra = augmented_hashes(hashes, splits, request.extract.views, request.extract.view_seed)
    everything = hashes + [h for view in extra for h in view]

    def waiting() -> None:
        say(f"another extraction in activation space {space} is running; waiting for it")

    # torch before Ray: inside a `ray job` whose working_dir was just unpacked, importing torch
    # after ray.init() has crashed in oneMKL (seen with Ray 2.60); the other order is safe.
    import unipt.extract.worker  # noqa: F401

    # A first look without the lock: when inputs are missing, Ray is connected before the lock is taken,
    # so an unreachable cluster fails here and leaves nothing (no lock file) behind.
    probe = _plan(request, space, everything)
    probe.release()
    partial = root.root.child(".partial")
    watch = HeadWatch(f"finished shards are kept under {partial}: run {same_command()} to resume from them")
    connected = [connect(ray_address)] if probe.missing else []
    if probe.missing:
        watch.start()

    def ensure_ray() -> None:
        # A segment the first look found may have been removed (gc) by the time the lock is ours.
        if not ray.is_initialized():
            connected.append(connect(ray_address))
        watch.start()

    try:
        # One lock per space: extractions of overlapping versions never build the same inputs twice.
        with exclusive(root.lock_location(space), on_wait=waiting):
            return _under_space_lock(request, space, hashes, extra, ensure_ray, progress, t0)
    except RayError as exc:
        if watch.head_lost(fresh=True):  # the workers failed because their head is gone: say that
            watch.fail_now()
        raise UniptError(
            f"extraction failed in a Ray worker: {root_cause(exc)}; any finished shards are kept under "
            f"{partial} and the same command resumes from them"
        ) from exc
    except BaseException:
        if watch.head_lost(fresh=True):
            watch.fail_now()
        raise
    finally:
        watch.stop()
        if watch.head_lost():  # lost just now: ray.shutdown() would wait a minute on it
            watch.fail_now()
        if any(connected):
            ray.shutdown()


def _under_space_lock(
    request: ExtractionRequest,
    space: str,
    hashes: list[str],
    extra: list[list[str]],
    ensure_ray: Callable[[], None],
    progress: bool,
    t0: float,
) -> ExtractionResult:
    root, key = request.cache_root, request.key
    hit = _leased_view(root, key)
    if hit is not None:  # written by the run we waited for
        return ExtractionResult(
            path=root.location(key), cache_hit=True, seconds=time.perf_counter() - t0, lease=hit
        )
    plan = _plan(request, space, hashes + [h for view in extra for h in view])
    try:
        return _build_view(request, plan, hashes, extra, ensure_ray, progress, t0)
    finally:
        plan.release()  # the result holds its own leases now


def _plan(request: ExtractionRequest, space: str, everything: list[str]) -> SpacePlan:
    """The space's plan; when it misses inputs, a plan over a space that holds them all with more layers
    than ``backbone.layers`` asks for, if the root has one (a view of those layers: no forward pass)."""
    plan = plan_space(request.cache_root, space, everything)
    if not plan.missing:
        return plan
    wider = plan_layer_subset(request.cache_root, request.key_fields, everything)
    if wider is None:
        return plan
    plan.release()
    return wider


def _build_view(
    request: ExtractionRequest,
    plan: SpacePlan,
    hashes: list[str],
    extra: list[list[str]],
    ensure_ray: Callable[[], None],
    progress: bool,
    t0: float,
) -> ExtractionResult:
    """Under the space lock: extract the missing inputs into one new segment, then write the view.
    ``extra`` holds the input hashes of augmented views 1.. (plan positions past the examples)."""
    root, key = request.cache_root, request.key
    _say_plan(plan, extra)
    leases = []
    try:
        result = ExtractionResult(path=root.location(key), cache_hit=not plan.missing)
        if plan.missing:
            ensure_ray()
            everything = hashes + [h for view in extra for h in view]
            result = _extract_missing(request, plan, everything, leases, progress, t0) or result
        readers = plan.readers
        # Taken before the view is published, and kept after the lock is let go: gc needs these leases
        # exclusively to remove the view or a segment, so it cannot delete what we are about to train on.
        leases.append(ReadLease(root.lease_location(key)))
        leases += [ReadLease(root.lease_location(s)) for s in readers]
        t_view = time.perf_counter()
        attrs = _view_attrs(request, next(iter(readers.values())))
        path = write_view(
            root, key, attrs, request.examples, hashes, plan.where, readers, views=extra, layers=plan.layers
        )
        if not plan.missing:
            say(f"wrote view {key} over {len(readers)} segment(s) in {time.perf_counter() - t_view:.2f}s")
        result.path = path
        result.seconds = time.perf_counter() - t0
        result.stats["reused_inputs"] = plan.reused
        result.stats["unique_inputs"] = plan.unique
        result.lease = LeaseSet(leases)
        return result
    except BaseException:
        for lease in leases:
            lease.release()
        raise


def _say_plan(plan: SpacePlan, extra: list[list[str]]) -> None:
    inputs = f"inputs (of {len(extra) + 1} views)" if extra else "inputs"
    if plan.missing:
        say(f"cache: {plan.reused:,} of {plan.unique:,} {inputs} reused; extracting {len(plan.missing):,}")
    elif plan.layers is not None:
        say(
            f"cache: all {plan.unique:,} inputs are in activation space {plan.space} with layers "
            f"{next(iter(plan.readers.values())).layers}; writing a view of layers {plan.layers} "
            "(no backbone forward pass)"
        )
    else:
        say(f"cache: all {plan.unique:,} inputs reused; writing the view only (no backbone forward pass)")


def _extract_missing(
    request: ExtractionRequest,
    plan: SpacePlan,
    everything: list[str],
    leases: list[ReadLease],
    progress: bool,
    t0: float,
) -> ExtractionResult | None:
    """Extract the plan's missing inputs into a new segment (or publish the one a previous run finished:
    then None) and add it to the plan's readers; its read lease joins ``leases``."""
    root, space, examples = request.cache_root, plan.space, request.examples
    new_hashes = [everything[i] for i in plan.missing]
    segment = segment_id(space, new_hashes)
    leases.append(ReadLease(root.lease_location(segment)))  # before it is published: gc keeps it
    write_space_file(root, space, space_key_fields(request.key_fields))
    result = None
    # The segment's build lock, held until it is published: the lock `unipt cache gc
    # --include-partial` needs to remove `.partial/<segment>`, so it never takes what we write.
    with exclusive(root.lock_location(segment)):
        builder = CacheBuilder(root, segment, final=root.segment_location(space, segment))
        if builder.publish_if_committed() is None:
            # Position p is view p // n of example p % n; views past 0 are augmented in the workers.
            n = examples.num_rows
            sources = [i % n for i in plan.missing]
            views = [everything[i] if i >= n else None for i in plan.missing]
            result = _extract(
                request,
                examples.take(sources),
                new_hashes,
                builder,
                space,
                progress,
                t0,
                views=views if any(v is not None for v in views) else None,
            )
    plan.readers[segment] = CacheReader(root.segment_location(space, segment))
    plan.where.update({h: (segment, row) for row, h in enumerate(new_hashes)})
    return result


def _view_attrs(request: ExtractionRequest, first: CacheReader) -> dict[str, Any]:
    """The view's own attributes; the backbone's come from its first segment."""
    attrs: dict[str, Any] = {
        "key_fields": request.key_fields,
        "dataset_fingerprint": request.key_fields.get("dataset_fingerprint"),
        "label_names": request.label_names,
    }
    if TEXT_PAIR_COLUMN in request.examples.column_names:  # a model trained on it must be given pairs too
        attrs["input"] = "text_pair"
    attrs["backbone"] = {**first.attrs.get("backbone", {}), "name": request.backbone_name}
    return attrs


def _leased_view(root: CacheRoot, key: str) -> ReadLease | None:
    """Read leases on the committed view ``key`` and every segment it reads (or a legacy cache), or None
    if there is none (any more) or a segment it names is gone (then it is rebuilt)."""
    if not root.has(key):
        return None
    lease = ReadLease(root.lease_location(key))
    attrs = read_attrs(root.location(key)) if root.has(key) else None
    if attrs is None:  # a gc removed it between the two looks
        lease.release()
        return None
    leases = [lease]
    for entry in attrs.get("segments", []) if attrs.get("kind") == VIEW_KIND else []:
        leases.append(ReadLease(root.lease_location(str(entry["id"]))))
        if not is_complete(root.segment_location(str(attrs.get("space_key")), str(entry["id"]))):
            for held in leases:
                held.release()
            return None
    return LeaseSet(leases)


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


# Ray resource names of the actor options we use.
_RESOURCE_NAMES = {"num_cpus": "CPU", "num_gpus": "GPU"}
FREE_WAIT_S = 10.0  # how long to let just-killed actors (a previous extraction) hand back their CPUs
MAX_RESTARTS = 3  # Ray restarts a dead extraction actor this often (a new process, the backbone reloaded)


def _worker_layout(setting: int | str) -> tuple[int, dict[str, float], int]:
    """(worker count, Ray resources per worker, torch threads per worker).

    With GPUs: one worker per GPU by default. Without: one worker per node by default, each taking
    that many CPUs as the smallest node has, so every worker fits on some node of a mixed cluster.
    The count is then cut to what the cluster can place now (one line says so), so actors never wait
    for resources that are not there; with room for none it fails at once.
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
        resources: dict[str, float] = {"num_gpus": 1, "num_cpus": 1}
        threads = max(1, total_cpus // max(count, 1))
    else:
        per_worker = max(1, min(total_cpus // count, min(node_cpus) if setting == "auto" else max(node_cpus)))
        resources, threads = {"num_cpus": per_worker}, per_worker
    placeable = _placeable(nodes, resources, count)
    if placeable < count:
        asked = f"{count} worker{'s' if count != 1 else ''} of {_show(resources)} each"
        have = _show_available(nodes)
        if placeable == 0:
            raise UniptError(
                f"extract.workers={setting} asks for {asked}, but the Ray cluster has room for none now "
                f"({have}); wait for other jobs to finish, add nodes, or lower extract.workers"
            )
        say(
            f"extract.workers={setting} asks for {asked}; the Ray cluster can place {placeable} now "
            f"({have}), so {placeable} will run"
        )
        count = placeable
    return count, resources, threads


def _placeable(nodes: list[dict[str, float]], resources: dict[str, float], wanted: int) -> int:
    """How many actors of ``resources`` fit: on the nodes' totals, and in what is free now."""

    def fits(pool: dict[str, float]) -> int:
        return min(int(pool.get(_RESOURCE_NAMES[k], 0) // v) for k, v in resources.items())

    capacity = sum(fits(node) for node in nodes)
    # What is free now: actors killed a moment ago (an extraction just before this one in the same
    # session) hand their CPUs back asynchronously, so give them a few seconds before settling for less.
    deadline = time.monotonic() + FREE_WAIT_S
    while True:
        free = fits(ray.available_resources())
        if free >= min(wanted, capacity) or time.monotonic() > deadline:
            return min(capacity, free)
        time.sleep(0.25)


def _show(resources: dict[str, float]) -> str:
    return " + ".join(f"{v:g} {_RESOURCE_NAMES[k]}" for k, v in resources.items())


def _show_available(nodes: list[dict[str, float]]) -> str:
    free = ray.available_resources()
    names = ["CPU"] + (["GPU"] if any(n.get("GPU") for n in nodes) else [])
    return ", ".join(
        f"{free.get(name, 0):g} of {sum(n.get(name, 0) for n in nodes):g} {name} free" for name in names
    )


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


def _extract(
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
    from unipt.extract.worker import SHARDS_IN_FLIGHT, ExtractionWorker

    count, resources, threads = _worker_layout(request.extract.workers)
    # A worker whose process dies (OOM, preemption, kill -9, its node lost) is restarted by Ray; its
    # shards are retried by WorkerPool, on any actor that is alive (see there).
    remote_worker = ray.remote(
        **resources, max_concurrency=SHARDS_IN_FLIGHT, max_restarts=MAX_RESTARTS, max_task_retries=0
    )(ExtractionWorker)
    workers = [remote_worker.remote(request.load_spec, threads) for _ in range(count)]
    try:
        pool = WorkerPool(
            workers, SHARDS_IN_FLIGHT, on_no_worker_ready=lambda: _say_none_ready(count, resources)
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


def _say_none_ready(count: int, resources: dict[str, float]) -> None:
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    say(
        f"waiting for extraction workers: none of {count} has loaded the backbone yet (each needs "
        f"{_show(resources)}; {_show_available(nodes)}: workers that are loading hold theirs, so none "
        "free can also mean they are starting)"
    )


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
