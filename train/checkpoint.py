"""Per-epoch training checkpoints: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint holds everything the next epoch depends on (model, optimizer, scheduler, grad scaler,
every RNG state, the history so far and the best weights), so a resumed run continues exactly where
the interrupted one stopped. Only tensors and plain Python types go in, which is what lets it load
with ``weights_only=True`` (no pickled code runs when a checkpoint is opened).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unipt.pipeline.errors import UniptError

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_VERSION = 1
# What a resumed run reads back: every checkpoint :func:`unipt.train.fit.fit` writes holds them all.
RESUME_KEYS = (
    "identity", "model", "optimizer", "scheduler", "scaler", "rng", "history", "best_state", "best_score",
    "best_epoch", "stopped", "train_seconds",
)  # fmt: skip


def resolve_checkpoint(target: str | Path) -> Path:
    """A run directory (its ``checkpoint.pt``) or a checkpoint file, checked to exist."""
    path = Path(target).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise UniptError(
            f"no checkpoint at {path}; --resume takes a run directory holding {CHECKPOINT_FILE} "
            "(or train.checkpoint_dir/<run_id>) or the checkpoint file itself"
        )
    return path


@dataclass(frozen=True)
class ResumePoint:
    """An interrupted run's last checkpoint, read once: where it is and what it holds (every
    :data:`RESUME_KEYS`). The recipe takes the run id and thread count from it, :func:`unipt.train.fit.fit`
    the states it continues from."""

    path: Path
    state: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any]:
        """What the run stored beside the states (its id, its torch thread count); {} if not a mapping."""
        meta = self.state.get("meta")
        return meta if isinstance(meta, dict) else {}

    @property
    def run_id(self) -> object:
        """The id the run stored, else its folder's name; the recipe checks it is a plain name."""
        return self.meta.get("run_id") or self.path.parent.name

    @property
    def torch_threads(self) -> int | None:
        """The torch thread count the run's epochs ran with (None if the checkpoint does not say)."""
        threads = self.meta.get("torch_threads")
        return int(threads) if isinstance(threads, int) and threads > 0 else None


def resume_point(target: str | Path) -> ResumePoint:
    """``--resume RUN_DIR_OR_CHECKPOINT``: the checkpoint found (:func:`resolve_checkpoint`) and read."""
    path = resolve_checkpoint(target)
    return ResumePoint(path, load_checkpoint(path))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` so that a crash leaves either the old or the new checkpoint, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            torch.save({"version": CHECKPOINT_VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # a full disk: OSError from open/fsync, RuntimeError from torch
        tmp.unlink(missing_ok=True)  # no half-written file stays behind; the previous checkpoint does
        reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:120]
        raise UniptError(
            f"could not write the checkpoint {path} ({reason}); free space there (or set "
            "train.checkpoint_dir / storage.runs_root to another disk) and train again"
        ) from exc


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holding objects weights_only refuses
        raise UniptError(
            f"checkpoint {path} could not be read ({type(exc).__name__}); it is damaged"
        ) from exc
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise UniptError(f"{path} is not a unipt training checkpoint (version {CHECKPOINT_VERSION})")
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise UniptError(
            f"checkpoint {path} lacks {', '.join(missing)}; it is damaged or incomplete: "
            "train without --resume"
        )
    return state


def rng_states() -> dict[str, Any]:
    """Every RNG training may touch, as tensors and plain types (weights_only-loadable)."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gauss": float(cached_gauss),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        # Only the GPUs that exist now: a run resumed with fewer visible GPUs than it was saved with.
        for index, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
    n = states["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached_gauss"])
    )
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
