"""The backbone's steady forward rate on the training device: what online training pays per token, beside
UniPT's step (``unipt plan``'s per-epoch verdict, :mod:`unipt.pipeline.experiment.plan`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from unipt.pipeline import experiment
from unipt.pipeline.config import ExperimentConfig
from unipt.pipeline.data.table import backbone_inputs
from unipt.pipeline.experiment.recipe import Prepared

if TYPE_CHECKING:
    import torch

    from unipt.extract.backbones import HFTextBackbone

# unipt plan times the backbone's forward for at least this long (and two passes over the sample): a GPU's
# pass over a 256-example sample takes milliseconds, too short for one pass to be its steady rate.
FORWARD_MIN_SECONDS = 1.0


def forward_rate(sampled: Prepared, name: str, config: ExperimentConfig, tokens: int) -> tuple[float, str]:
    """(tokens/s, device): the backbone's steady forward rate over the sample's inputs on the training device
    (``train.device``), in this process: what online training pays per token, beside UniPT's step.

    A text backbone is timed as the online baseline runs it (:mod:`benchmarks.online_baselines`): the inputs
    tokenized beforehand (online training tokenizes once, before its first epoch), batches of
    ``train.batch_size`` padded to their longest input (length-sorted under ``train.length_grouping``), every
    hidden state computed under training's autocast and left on the device (:func:`steady_forward_rate`).
    Other backbones (images) are timed through their extraction ``encode`` (``tokens`` in all, as the sample
    cache counts them), preprocessing and the copy to the host included.
    """
    import torch

    from unipt.extract.backbones import HFTextBackbone, load_backbone
    from unipt.train.fit import pick_device

    device = pick_device(config.train.device)
    target = sampled.backbones[name]
    settings = target.config
    backbone = load_backbone(experiment.load_spec(target, config.extract.autocast, device=device.type))
    inputs = backbone_inputs(sampled.dataset.table, backbone.describe()["input"])
    if isinstance(backbone, HFTextBackbone):
        return steady_forward_rate(backbone, inputs, settings.max_length, config, device), device.type
    count = int(backbone.describe()["num_hidden_states"])
    layers = list(range(count)) if settings.layers == "all" else list(settings.layers)
    compute = "float16" if config.extract.dtype == "float16" else "float32"
    # Warm-up: first-call allocations and kernel choice.
    backbone.encode(inputs[: settings.batch_size], layers, settings.max_length, settings.batch_size, compute)
    seconds = float("inf")
    for _ in range(2):  # the faster of two passes: a busy machine's worst moment is not the rate
        started = time.perf_counter()
        backbone.encode(inputs, layers, settings.max_length, settings.batch_size, compute)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = min(seconds, time.perf_counter() - started)
    return tokens / seconds if seconds > 0 else 0.0, device.type


def steady_forward_rate(
    backbone: HFTextBackbone, inputs: list, max_length: int, config: ExperimentConfig, device: torch.device
) -> float:
    """Real tokens per second of ``backbone``'s forward over ``inputs``, batched and computed as online
    training computes them (see :func:`forward_rate`).

    Only the forward is timed: tokenizing, padding and the copy to the device happen before. One batch of
    the largest shape warms up first (allocations, kernel choice), then passes over the batches repeat, at
    least two and for :data:`FORWARD_MIN_SECONDS`, each ended by a device synchronize; the fastest pass gives
    the rate, since a busy machine's worst moment is not the backbone's rate. Padding is paid for: the rate
    counts real tokens only, as an epoch's token count does.
    """
    import torch

    from unipt.train.fit import amp_dtype, precision

    encoded = dict(backbone._tokenize(inputs, max_length))
    keys = [key for key in encoded if backbone._accepts is None or key in backbone._accepts]
    lengths = np.array([len(ids) for ids in encoded["input_ids"]], dtype=np.int64)
    order = np.argsort(lengths, kind="stable") if config.train.length_grouping else np.arange(len(lengths))
    backbone.tokenizer.padding_side = "right"  # as the online baseline pads (a cache's layout)
    batches = []
    for start in range(0, len(order), config.train.batch_size):
        picked = order[start : start + config.train.batch_size]
        features = backbone.tokenizer.pad(
            {key: [encoded[key][i] for i in picked] for key in keys}, return_tensors="pt"
        )
        batches.append({key: value.to(device) for key, value in features.items()})
    amp = amp_dtype(config.train.amp, device)

    def forward(batch: dict[str, torch.Tensor]) -> None:
        with torch.inference_mode(), precision(device, amp):
            backbone.model(**batch, output_hidden_states=True, return_dict=True)

    def pass_seconds(todo: list[dict[str, torch.Tensor]]) -> float:
        started = time.perf_counter()
        for batch in todo:
            forward(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    if not batches:
        return 0.0
    pass_seconds([max(batches, key=lambda batch: batch["input_ids"].numel())])  # warm-up
    seconds, spent, passes = float("inf"), 0.0, 0
    while passes < 2 or spent < FORWARD_MIN_SECONDS:
        elapsed = pass_seconds(batches)
        seconds, spent, passes = min(seconds, elapsed), spent + elapsed, passes + 1
    return float(lengths.sum()) / seconds if seconds > 0 else 0.0
