"""Who a run is before any work (the first call of :func:`unipt.pipeline.experiment.recipe.run`): a fresh
run id, or an interrupted run's own id with its last checkpoint, read once
(:func:`unipt.train.checkpoint.resume_point`), which training then continues from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unipt.pipeline.errors import UniptError
from unipt.pipeline.experiment.preparation import Prepared
from unipt.pipeline.experiment.recording import RunResult, fresh_run_id, recorded_result
from unipt.pipeline.log import say
from unipt.pipeline.runs.records import RECORD_FILE, check_run_id
from unipt.pipeline.runs.registration import ready_registry
from unipt.train.checkpoint import CHECKPOINT_FILE, ResumePoint, resume_point


@dataclass
class RunStart:
    """A run before its work: its id and the checkpoint it continues from; ``finished``: the recorded
    result of a resumed run that had finished but not registered itself (there is nothing left to do)."""

    run_id: str
    resume: ResumePoint | None = None
    finished: RunResult | None = None

    @property
    def torch_threads(self) -> int | None:
        """A resumed run keeps the thread count its first epochs ran with, so it ends where it would have."""
        return self.resume.torch_threads if self.resume is not None else None

    def checkpoint_file(self, prep: Prepared) -> Path:
        """Where the run writes its checkpoint after every epoch."""
        root = prep.config.train.checkpoint_dir or prep.config.storage.runs_root
        return Path(root).expanduser() / self.run_id / CHECKPOINT_FILE


def start_run(prep: Prepared, resume: str | None) -> RunStart:
    """Before any extraction or training: the registry is opened and checked (a read-only, damaged or
    locked one fails now, not after the work), and runs that finished without registering are registered.
    Then the run's id: a fresh one, or the interrupted run's own, from ``--resume RUN_DIR_OR_CHECKPOINT``.
    Resuming a run that finished but had not registered gives its recorded result; one that finished and
    is registered is refused."""
    storage = prep.config.storage
    registered = ready_registry(storage.registry, storage.runs_root)
    if resume is None:
        return RunStart(fresh_run_id(prep))
    point = resume_point(resume)
    run_id = check_run_id(point.run_id)
    run_dir = Path(storage.runs_root).expanduser() / run_id
    if not (run_dir / RECORD_FILE).exists():
        say(f"resuming run {run_id} from {point.path}")
        return RunStart(run_id, point)
    if run_id not in registered:
        raise UniptError(
            f"run {run_id} already finished (it has a {RECORD_FILE}) and is registered; nothing to resume: "
            f"`unipt runs show {run_id}` shows it"
        )
    say(
        f"run {run_id} had finished (its {RECORD_FILE} is written) but stopped before registering itself; "
        f"it is registered in {storage.registry} now; nothing left to train"
    )
    return RunStart(run_id, point, finished=recorded_result(run_dir))


def run_to_continue(prep: Prepared, resume: str | None) -> tuple[str, Path | None]:
    """(run id, checkpoint to resume from): a fresh id, or the interrupted run's own id and checkpoint; a
    finished run is refused. (The recipe uses :func:`start_run`, which also readies the registry.)"""
    if resume is None:
        return fresh_run_id(prep), None
    point = resume_point(resume)
    run_id = check_run_id(point.run_id)
    if (Path(prep.config.storage.runs_root).expanduser() / run_id / RECORD_FILE).exists():
        raise UniptError(f"run {run_id} already finished (it has a {RECORD_FILE}); nothing to resume")
    return run_id, point.path


def checkpoint_threads(checkpoint: Path) -> int | None:
    """The torch thread count a checkpoint's epochs ran with (None if it does not say)."""
    return resume_point(checkpoint).torch_threads
