"""The epoch loop every task shares: AdamW, warmup + cosine, AMP on CUDA, early stopping, checkpoints.

A task (classification, regression, retrieval) supplies its model, its training batches, a loss and
a validation function; :func:`fit` does the rest and leaves the model holding its best weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from unipt.pipeline.config import TrainConfig, names_affecting, settings_affecting, upgrade
from unipt.pipeline.cuda_support import native_bf16, no_cuda_cause, warn_if_emulated_bf16
from unipt.pipeline.errors import UniptError
from unipt.pipeline.log import say
from unipt.train.checkpoint import ResumePoint, restore_rng_states, rng_states, save_checkpoint


class EpochData(Protocol):
    """Batches of one split, like :class:`unipt.train.loader.CacheBatches`: ``len()`` batches per
    ``epoch(n)``."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int = 0) -> Iterator[Any]: ...


@dataclass
class Task:
    """What one kind of training contributes to :func:`fit`."""

    model: nn.Module
    train_data: EpochData
    loss: Callable[[Any, torch.device], tuple[torch.Tensor, int]]  # (mean loss, examples in the batch)
    validate: Callable[[], dict[str, float]]  # val metrics; {} when there is no validation split
    score: str  # the validation metric to maximise (a key of validate()'s result)
    identity: dict[str, Any] = field(default_factory=dict)  # what the data is; a resume must match it


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best_epoch: int
    train_seconds: float
    stopped_early: bool
    amp: str  # the autocast dtype training ran in ("off", "float16", "bfloat16"): what the record says


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise UniptError("train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(setting)


def device_reason(setting: str, device: torch.device) -> str:
    """Which device trains and why, for the run record and the summary line: a CPU fallback must show."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if setting == "cpu":
        return "cpu (train.device: cpu)"
    return f"cpu (no GPU visible: {no_cuda_cause()})"


# The device types training autocasts on. Not the CPU: autocast there is slower than float32. (A test
# that adds "cpu" runs every autocast path for real, in bf16, on a machine without a GPU.)
AUTOCAST_DEVICES = frozenset({"cuda"})


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision. Only CUDA gets AMP (:data:`AUTOCAST_DEVICES`).

    ``auto`` is bf16 only where the card has bf16 tensor cores (:mod:`unipt.pipeline.cuda_support`), else fp16
    (with a GradScaler, see :func:`fit`)."""
    if device.type not in AUTOCAST_DEVICES or setting == "off":
        return None
    if setting == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.bfloat16 if setting == "bfloat16" else torch.float16


def amp_name(dtype: torch.dtype | None) -> str:
    """How the record and the checkpoint name an autocast dtype: ``off``, ``float16`` or ``bfloat16``."""
    return "off" if dtype is None else str(dtype).removeprefix("torch.")


def precision(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The autocast training runs under; evaluation uses the same, so the best epoch (picked on val) and
    the reported val and test metrics are computed alike."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def adamw(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """The optimizer every run uses; on CUDA the fused kernel (one launch per step instead of one per
    parameter tensor)."""
    return torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=device.type == "cuda"
    )


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fit_identity(config: TrainConfig, seed: int, task: Task) -> dict[str, Any]:
    # Only what changes what is computed (each field declares it): a run may resume with another device.
    return {"train": settings_affecting(config, "training"), "seed": seed, "data": task.identity}


@dataclass(frozen=True)
class StepHook:
    """``call(step, values)`` after every ``every``-th optimiser step, counted over the whole run from 1:
    ``train_step_loss`` (that batch's loss) and ``train_step_lr`` (the learning rate it stepped with). Only
    those steps read the loss back from the device, so a GPU does not wait on every step."""

    every: int
    call: Callable[[int, dict[str, float]], None]


@dataclass
class TrainOptions:
    """How a training run reports and persists itself; none of it changes what is computed. It goes
    whole from the recipe (or :func:`unipt.train.tasks.train_task`) through the task to :func:`fit`."""

    progress: bool = True
    checkpoint: Path | None = None  # written after every epoch
    resume: ResumePoint | None = None  # the checkpoint to continue from, read (train.checkpoint)
    meta: dict[str, Any] | None = None  # stored in each checkpoint as is (e.g. the run id)
    # (epoch, its history record) after an epoch's checkpoint is written: e.g. a sweep reports it to its
    # scheduler
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None
    on_step: StepHook | None = None  # the loss every few optimiser steps (a tracking sink's loss curve)


def fit(task: Task, config: TrainConfig, seed: int, device: torch.device, options: TrainOptions) -> FitResult:
    """Train ``task.model`` for ``config.epochs`` (fewer if early stopping fires) and load its best weights.

    ``options.resume`` continues from a checkpoint made with the same settings and data; the other
    options are in :class:`TrainOptions`.
    """
    try:
        return _fit(task, config, seed, device, options)
    except torch.OutOfMemoryError as exc:
        raise UniptError(
            f"out of GPU memory while training with train.batch_size={config.batch_size}; lower "
            f"train.batch_size (e.g. {max(1, config.batch_size // 2)}) and run again"
        ) from exc


@dataclass
class _Run:
    """What one fit carries from epoch to epoch: the model and its optimizer, and what a checkpoint saves."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    history: list[dict[str, Any]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    best_score: float = -math.inf
    best_epoch: int = -1
    stopped: bool = False
    seconds_before: float = 0.0  # training time of the run before a resume


def _fit(
    task: Task,
    config: TrainConfig,
    seed: int,
    device: torch.device,
    options: TrainOptions,
) -> FitResult:
    if not len(task.train_data):
        raise UniptError("the cache has no training examples; check the dataset's split settings")
    autocast_dtype = amp_dtype(config.amp, device)
    if config.amp == "bfloat16" and device.type == "cuda":
        warn_if_emulated_bf16("train.amp", device)
    amp = amp_name(autocast_dtype)
    run = _start(task, config, device, autocast_dtype)
    identity = fit_identity(config, seed, task)
    resume = options.resume.path if options.resume is not None else None
    if options.resume is not None:
        _continue(run, options.resume, identity, amp)

    def autocast() -> Any:
        return precision(device, autocast_dtype)

    t0 = time.perf_counter()
    start = len(run.history)
    epochs = tqdm(
        range(start, config.epochs),
        initial=start,
        total=config.epochs,
        desc="train",
        unit="epoch",
        disable=not options.progress or run.stopped,
        dynamic_ncols=True,
    )
    for epoch in epochs:
        if run.stopped:
            break
        epoch_start = time.perf_counter()
        train_loss = _train_epoch(run, task, epoch, device, autocast, options)
        with autocast():
            val = task.validate()
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "lr": run.schedule.get_last_lr()[0],
            "seconds": time.perf_counter() - epoch_start,
            **{f"val_{k}": v for k, v in val.items()},
        }
        _keep_best(run, record, val, task.score, config.early_stopping_patience)
        epochs.set_postfix(loss=f"{train_loss:.4f}", **{task.score: f"{val.get(task.score, math.nan):.4f}"})
        if options.checkpoint is not None:
            seconds = run.seconds_before + time.perf_counter() - t0
            save_checkpoint(options.checkpoint, _checkpoint(run, identity, options, amp, epoch + 1, seconds))
        if options.on_epoch_end is not None:
            options.on_epoch_end(epoch + 1, record)
    train_seconds = run.seconds_before + time.perf_counter() - t0
    if run.best_state is None:
        raise UniptError(f"checkpoint {resume} holds no finished epoch; start the run again without --resume")
    run.model.load_state_dict(run.best_state)
    return FitResult(run.history, run.best_epoch, train_seconds, run.stopped, amp)


def _start(task: Task, config: TrainConfig, device: torch.device, autocast_dtype: torch.dtype | None) -> _Run:
    """The model on ``device`` with AdamW, the warmup-cosine schedule over every step, and a loss scaler."""
    model = task.model.to(device)
    optimizer = adamw(model, config, device)
    total_steps = config.epochs * len(task.train_data)
    warmup = max(1, int(config.warmup_ratio * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup))
    # Loss scaling is only needed for fp16: bf16 has float32's exponent range.
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    return _Run(model, optimizer, schedule, scaler)


def _continue(run: _Run, resume: ResumePoint, identity: dict[str, Any], amp: str) -> None:
    """Load a checkpoint of the same run into ``run``: weights, optimizer, schedule, history and RNGs."""
    saved = resume.state
    _check_same_run(saved["identity"], identity, resume.path)
    try:
        run.model.load_state_dict(saved["model"])
        run.optimizer.load_state_dict(saved["optimizer"])
        run.schedule.load_state_dict(saved["scheduler"])
        _resume_scaler(run.scaler, saved, amp, resume.path)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # tensors of other shapes or kinds
        first = " ".join(str(exc).split())[:160]
        raise UniptError(
            f"checkpoint {resume.path} does not fit this run's model ({first}); train without --resume"
        ) from exc
    run.history, run.best_state = saved["history"], saved["best_state"]
    run.best_score, run.best_epoch, run.stopped = saved["best_score"], saved["best_epoch"], saved["stopped"]
    run.seconds_before = saved["train_seconds"]
    restore_rng_states(saved["rng"])


def _train_epoch(
    run: _Run,
    task: Task,
    epoch: int,
    device: torch.device,
    autocast: Callable[[], Any],
    options: TrainOptions,
) -> float:
    """One pass over the training batches; the mean training loss."""
    run.model.train()
    # Summed on the device and read once an epoch: a .item() per step would wait for the GPU each step.
    loss_sum, seen = torch.zeros((), device=device), 0
    steps = _steps(task.train_data.epoch(epoch), len(task.train_data), epoch, options.progress)
    for step, batch in enumerate(steps, start=epoch * len(task.train_data) + 1):
        with autocast():
            loss, n = task.loss(batch, device)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if options.on_step is not None and step % options.on_step.every == 0:
            lr = run.schedule.get_last_lr()[0]  # the rate this step used, before the schedule moves on
            values = {"train_step_loss": loss.detach().float().item(), "train_step_lr": lr}
            options.on_step.call(step, values)
        run.schedule.step()
        loss_sum += loss.detach().float() * n
        seen += n
    return loss_sum.item() / seen


def _keep_best(
    run: _Run, record: dict[str, Any], val: dict[str, float], score_name: str, patience: int | None
) -> None:
    """Add the epoch to the history; keep its weights when its score is the best so far (a NaN score never
    is), or stop once ``patience`` epochs have passed without a better one."""
    run.history.append(record)
    score = val[score_name] if val else -record["train_loss"]
    score = -math.inf if math.isnan(score) else score
    if run.best_epoch < 0 or score > run.best_score:
        run.best_score, run.best_epoch = score, record["epoch"]
        run.best_state = copy.deepcopy(run.model.state_dict())
    elif patience is not None:
        run.stopped = record["epoch"] - run.best_epoch >= patience


def _checkpoint(
    run: _Run, identity: dict[str, Any], options: TrainOptions, amp: str, epoch: int, seconds: float
) -> dict[str, Any]:
    """Everything a resume needs to continue after ``epoch`` as if the run had never stopped."""
    return {
        "identity": identity,
        "meta": options.meta or {},
        "epoch": epoch,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.schedule.state_dict(),
        "scaler": run.scaler.state_dict(),
        "amp": amp,
        "rng": rng_states(),
        "history": run.history,
        "best_state": run.best_state,
        "best_score": run.best_score,
        "best_epoch": run.best_epoch,
        "stopped": run.stopped,
        "train_seconds": seconds,
    }


def _resume_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any], amp: str, path: Path) -> None:
    """Load the checkpoint's GradScaler state when both sides scale (fp16); say when the precision changed.

    A run resumed on another card (or CPU) may resolve ``train.amp: auto`` differently: a disabled
    scaler's state is empty and cannot be loaded into an enabled one, and the reverse has nothing to load.
    """
    was = saved.get("amp")  # checkpoints from before it was recorded do not say
    if was is not None and was != amp:
        say(f"checkpoint {path} was trained with amp {was}; resuming with amp {amp} (this card's precision)")
    if scaler.is_enabled() and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])


def _steps(batches: Iterable[Any], total: int, epoch: int, progress: bool) -> Iterable[Any]:
    return tqdm(
        batches,
        total=total,
        desc=f"epoch {epoch + 1}",
        leave=False,
        unit="batch",
        disable=not progress,
        dynamic_ncols=True,
    )


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """A resumed run must compute what the interrupted one would have: same settings, seed and data."""
    for section in ("train", "seed", "data"):
        was, now = saved.get(section), current.get(section)
        if section == "train" and isinstance(was, dict):
            # Old names and what settings added since computed before they existed (the compatibility
            # rules); any other setting added after the checkpoint was written computed what its default does.
            was = upgrade({"train": was}, stored=True)["train"]
            fields = TrainConfig.model_fields
            defaults = {k: fields[k].default for k in names_affecting(TrainConfig, "training")}
            was = {**{k: v for k, v in defaults.items() if k in (now or {})}, **was}
        if was == now:
            continue
        if isinstance(was, dict) and isinstance(now, dict):
            key = next(k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k))
            where = f"{section}.{key}" if section == "train" else f"{section} {key}"
            detail = f"{where} was {was.get(key)!r}, now {now.get(key)!r}"
        else:
            detail = f"{section} was {was!r}, now {now!r}"
        raise UniptError(
            f"checkpoint {path} was made with other settings ({detail}); resume with the same config"
        )
