"""The extraction driver: find the dataset version's view, or plan which inputs its activation space lacks,
extract those into a new segment (:mod:`unipt.extract.segment`) and write the view.

The driver never imports ``transformers``: backbones live only in the worker processes, which are gone when
extraction returns, so a training step in the same process holds no backbone in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayError

from unipt.extract.ray_session import HeadWatch, connect, root_cause, same_command
from unipt.extract.request import ExtractionRequest, ExtractionResult
from unipt.extract.segment import extract_segment
from unipt.pipeline.cache.identity import space_key, space_key_fields
from unipt.pipeline.cache.layout import VIEW_KIND
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
from unipt.pipeline.data.augment import augmented_hashes
from unipt.pipeline.data.table import TEXT_PAIR_COLUMN, input_hashes
from unipt.pipeline.errors import UniptError
from unipt.pipeline.log import say


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
    return _in_space(request, space, hashes, extra, ray_address, progress, t0)


def _in_space(
    request: ExtractionRequest,
    space: str,
    hashes: list[str],
    extra: list[list[str]],
    ray_address: str | None,
    progress: bool,
    t0: float,
) -> ExtractionResult:
    """Build the view under the space's lock, Ray connected first when inputs are missing; a Ray worker's
    failure (or its head's loss) ends in one line."""
    root = request.cache_root
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
            result = extract_segment(
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
    attrs["backbone"] = {**first.meta.backbone, "name": request.backbone_name}
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
