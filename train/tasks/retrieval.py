"""Retrieval: a query and a gallery backbone's caches of one dataset, each side its own UniPT, trained
contrastively (symmetric InfoNCE); R@1/5/10 both ways and rSum. The model and its data are in
:mod:`unipt.train.contrastive`."""

from __future__ import annotations

import torch
from torch import Tensor

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.config import TrainConfig
from unipt.pipeline.errors import UniptError
from unipt.pipeline.log import say
from unipt.pipeline.tasks import get_task, select_metric
from unipt.train.contrastive import (
    RetrievalModel,
    check_aligned,
    contrastive_loss,
    evaluate_retrieval,
    paired_batches,
)
from unipt.train.fit import Task, TrainOptions, amp_dtype, fit, pick_device, precision
from unipt.train.loader import Batch
from unipt.train.loop import TrainResult, final_metrics


def train(
    readers: list[ActivationCache], config: TrainConfig, seed: int, options: TrainOptions
) -> TrainResult:
    """``layer_weights`` in the result are the query side's (test split); the gallery's are beside them."""
    if len(readers) != 2:
        raise UniptError(
            f"train.task {config.task!r} needs two caches of one dataset (a query and a gallery backbone), "
            f"got {len(readers)}; use a config with two `backbones`"
        )
    query_reader, gallery_reader = readers
    check_aligned(query_reader, gallery_reader)
    torch.manual_seed(seed)
    device = pick_device(config.device)
    model = RetrievalModel(
        [query_reader.hidden_sizes[layer] for layer in query_reader.layers],
        [gallery_reader.hidden_sizes[layer] for layer in gallery_reader.layers],
        embed_size=config.embed_size,
        downsample_factor=config.downsample_factor,
        dropout=config.dropout,
    ).to(device)
    train_data, val_data, test_data = (
        paired_batches(query_reader, gallery_reader, split, config, seed, shuffle=split == "train")
        for split in ("train", "val", "test")
    )

    def loss(batch: tuple[Batch, Batch], device: torch.device) -> tuple[Tensor, int]:
        query, gallery = batch
        return contrastive_loss(model(query, gallery, device).float()), len(query.indices)

    def validate() -> dict[str, float]:
        if not len(val_data):
            return {}
        metrics = evaluate_retrieval(model, val_data, device)
        return {k: v for k, v in metrics.items() if not k.endswith("layer_weights")}

    info = get_task(config.task)
    identity = {
        "query": {"cache_key": query_reader.meta.cache_key},
        "gallery": {"cache_key": gallery_reader.meta.cache_key},
    }
    score, why = select_metric(info, config.select_metric, None)
    say(f"best epoch chosen by val_{score} ({why})")
    task = Task(model, train_data, loss, validate, score, identity)
    fitted = fit(task, config, seed, device, options)
    with precision(device, amp_dtype(config.amp, device)):  # as training and validation ran
        test = evaluate_retrieval(model, test_data, device)
    metrics = final_metrics(fitted, test, info.metrics, config, model)
    metrics["temperature"] = float(1.0 / model.scale().detach())
    return TrainResult(
        metrics=metrics,
        history=fitted.history,
        layer_weights=test["query_layer_weights"],
        gallery_layer_weights=test["gallery_layer_weights"],
        model=model,
        select_metric=score,
        amp=fitted.amp,
    )
