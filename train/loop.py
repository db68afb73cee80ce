"""Train a UniPT classifier from a cache: AdamW, warmup + cosine, best-on-validation weights."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.cache import ActivationCache
from pipeline.config import TrainConfig
from pipeline.errors import UniptError
from train.loader import Batch, CacheBatches
from train.metrics import accuracy, macro_f1
from train.models import build_model


class BatchSource(Protocol):
    """Batches of one split, like :class:`CacheBatches`: ``len()`` batches per ``epoch(n)``."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int = 0) -> Iterator[Batch]: ...


@dataclass
class TrainResult:
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    layer_weights: list[float] = field(default_factory=list)  # mean confidence per layer on test


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise UniptError("train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(setting)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_classifier(
    reader: ActivationCache, config: TrainConfig, seed: int, progress: bool = True
) -> TrainResult:
    torch.manual_seed(seed)
    device = pick_device(config.device)
    layers = reader.layers
    model = build_model(config.variant, reader, config).to(device)

    def batches(split: str, shuffle: bool) -> CacheBatches:
        return CacheBatches(
            reader,
            split,
            layers,
            config.batch_size,
            shuffle=shuffle,
            seed=seed,
            block_examples=config.block_examples,
            shuffle_buffer_blocks=config.shuffle_buffer_blocks,
        )

    train_data, val_data, test_data = batches("train", True), batches("val", False), batches("test", False)
    return fit_classifier(
        model, train_data, val_data, test_data, config, len(reader.label_names), device, progress
    )


def fit_classifier(
    model: nn.Module,
    train_data: BatchSource,
    val_data: BatchSource,
    test_data: BatchSource,
    config: TrainConfig,
    num_classes: int,
    device: torch.device,
    progress: bool = True,
) -> TrainResult:
    """The optimisation shared by every way of feeding a classifier (a cache, or a backbone run online).

    ``model(hidden, mask)`` returns ``(logits, layer_weights)``; seed torch before building it.
    """
    if len(train_data) == 0:
        raise UniptError("there are no training examples; check the dataset's split settings")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * len(train_data)
    warmup = max(1, int(config.warmup_ratio * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup))
    loss_fn = nn.CrossEntropyLoss()

    history: list[dict[str, float]] = []
    best_state, best_val, best_epoch = None, -math.inf, -1
    t0 = time.perf_counter()
    epochs = tqdm(range(config.epochs), desc="train", unit="epoch", disable=not progress, dynamic_ncols=True)
    for epoch in epochs:
        model.train()
        epoch_start, loss_sum, seen = time.perf_counter(), 0.0, 0
        steps = tqdm(
            train_data.epoch(epoch),
            total=len(train_data),
            desc=f"epoch {epoch + 1}",
            leave=False,
            unit="batch",
            disable=not progress,
            dynamic_ncols=True,
        )
        for batch in steps:
            logits, _ = model([h.to(device) for h in batch.hidden], batch.mask.to(device))
            loss = loss_fn(logits, batch.labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(batch.labels)
            seen += len(batch.labels)
        val = evaluate(model, val_data, device, num_classes) if len(val_data) else {}
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "seconds": time.perf_counter() - epoch_start,
            **{f"val_{k}": v for k, v in val.items() if k != "layer_weights"},
        }
        history.append(record)
        epochs.set_postfix(
            loss=f"{record['train_loss']:.4f}", val_acc=f"{record.get('val_acc', float('nan')):.4f}"
        )
        score = record.get("val_acc", -record["train_loss"])
        if score > best_val:
            best_val, best_epoch = score, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
    train_seconds = time.perf_counter() - t0

    model.load_state_dict(best_state)
    test = evaluate(model, test_data, device, num_classes)
    best = history[best_epoch - 1]  # its validation metrics were measured with exactly these weights
    metrics = {
        "val_acc": best.get("val_acc", float("nan")),
        "val_f1": best.get("val_f1", float("nan")),
        "test_acc": test["acc"],
        "test_f1": test["f1"],
        "best_epoch": best_epoch,
        "epochs": config.epochs,
        "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / config.epochs,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    return TrainResult(metrics=metrics, history=history, layer_weights=test["layer_weights"])


@torch.no_grad()
def evaluate(model: nn.Module, data: BatchSource, device: torch.device, num_classes: int) -> dict:
    model.eval()
    if len(data) == 0:
        return {"acc": float("nan"), "f1": float("nan"), "layer_weights": []}
    predictions, labels, weights = [], [], []
    for batch in data.epoch(0):
        logits, layer_weights = model([h.to(device) for h in batch.hidden], batch.mask.to(device))
        predictions.append(logits.argmax(-1).cpu())
        labels.append(batch.labels)
        weights.append(layer_weights.cpu())
    predictions, labels = torch.cat(predictions), torch.cat(labels)
    return {
        "acc": accuracy(predictions, labels),
        "f1": macro_f1(predictions, labels, num_classes),
        "layer_weights": torch.cat(weights).mean(0).tolist(),
    }
