"""How many extraction actors the Ray cluster can place, and with what share of it each."""

from __future__ import annotations

import time

import ray

from unipt.pipeline.errors import UniptError
from unipt.pipeline.log import say

# Ray resource names of the actor options we use.
_RESOURCE_NAMES = {"num_cpus": "CPU", "num_gpus": "GPU"}
FREE_WAIT_S = 10.0  # how long to let just-killed actors (a previous extraction) hand back their CPUs


def worker_layout(setting: int | str) -> tuple[int, dict[str, float], int]:
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


def say_none_ready(count: int, resources: dict[str, float]) -> None:
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    say(
        f"waiting for extraction workers: none of {count} has loaded the backbone yet (each needs "
        f"{_show(resources)}; {_show_available(nodes)}: workers that are loading hold theirs, so none "
        "free can also mean they are starting)"
    )
