"""Each sweep trial's share of the Ray cluster (CPUs and a GPU fraction) and how many trials run at once."""

from __future__ import annotations

import math

from unipt.pipeline.errors import UniptError

RAY_RESOURCE_STEP = 1e-4  # Ray's resolution for fractional resources
TRIALS_PER_GPU = 2  # the default parallelism on a GPU machine, per GPU: overlaps one trial's data wait


def gpu_share(parallel: int, gpus: float) -> float:
    """Each trial's GPU share when ``parallel`` trials split ``gpus``: ``1 / ceil(parallel / gpus)``,
    floored to Ray's resolution (a rounded-up share would fit one trial fewer on a GPU: 1/6 -> 0.1667
    fits 5) and at most one GPU (a trial uses one; a share of 2 would hold a GPU it never touches)."""
    if gpus <= 0:
        return 0.0
    per_gpu = math.ceil(parallel / gpus)
    return min(1.0, math.floor(round(1 / per_gpu / RAY_RESOURCE_STEP, 6)) * RAY_RESOURCE_STEP)


def default_parallel(cpus: int, gpus: float) -> int:
    """Trials at a time when ``--parallel`` is not given: a small multiple of the GPUs on a GPU cluster
    (one per CPU would put 16 processes on one GPU), else one per CPU."""
    return max(1, int(TRIALS_PER_GPU * gpus)) if gpus > 0 else cpus


def cluster_resources() -> dict[str, float]:
    """The connected Ray cluster's resources (``CPU``, ``GPU``, ...)."""
    import ray

    return ray.cluster_resources()


def trial_resources(
    cluster: dict[str, float], parallel: int | None, gpus_per_trial: float | None, total: int
) -> tuple[dict, int]:
    """Each trial's request ({"cpu", "gpu"}) and how many run at once, on a Ray ``cluster`` of those
    resources (``ray.cluster_resources()``).

    An even split of the cluster: ``cpus // parallel`` CPUs and, when it has GPUs, :func:`gpu_share`
    of a GPU. A trial with no GPU share trains on the CPU (see
    :func:`~unipt.pipeline.experiment.sweep_trial.run_trial`).
    """
    cpus, gpus = max(1, int(cluster.get("CPU", 1))), float(cluster.get("GPU", 0))
    parallel = min(parallel or default_parallel(cpus, gpus), total)
    share = max(1, cpus // parallel)
    if gpus_per_trial is None:
        gpu = gpu_share(parallel, gpus)
    else:
        gpu = float(gpus_per_trial)
        if gpu > gpus:
            raise UniptError(
                f"--gpus-per-trial {gpu:g} but the Ray cluster has {gpus:g} GPU(s); give at most that, "
                "or 0 to train on CPUs"
            )
    return {"cpu": share, "gpu": gpu}, parallel
