"""Two runs compared: which config keys, metrics and identities differ, and which metrics must agree
exactly when a run is redone (``unipt rerun``, ``unipt runs diff``)."""

from __future__ import annotations

import math
from typing import Any

# Wall-clock measurements: they differ between two runs of the same thing, so they are not "results".
TIMING_METRICS = frozenset({"train_seconds", "seconds_per_epoch"})


def result_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics two runs of the same thing must agree on exactly (everything but timings)."""
    return {k: v for k, v in metrics.items() if k not in TIMING_METRICS}


def same_value(a: Any, b: Any) -> bool:
    """Exact equality, with NaN equal to NaN (an empty split's accuracy is NaN in both runs)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    if not tree and prefix:
        flat[prefix] = {}
    return flat


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for every key whose values differ; absent is ``None``."""
    fa, fb = flatten(a), flatten(b)
    missing = object()
    out = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, missing), fb.get(key, missing)
        if va is missing or vb is missing or not same_value(va, vb):
            out.append((key, None if va is missing else va, None if vb is missing else vb))
    return out
