"""Build the model a training config asks for (UniPT by variant, or another method by ``train.method``),
checked against the cache it will read."""

from __future__ import annotations

from typing import Literal

from torch import nn

from pipeline.cache import ActivationCache
from pipeline.config import TrainConfig
from pipeline.errors import UniptError
from train.methods import build_method
from train.unipt import UniPTClassifier
from train.unipt_clip4clip import UniPTClip4ClipClassifier
from train.unipt_cnn import UniPTCNNClassifier, stride_ratios

Variant = Literal["transformer", "cnn", "clip4clip"]
VARIANTS: tuple[str, ...] = ("transformer", "cnn", "clip4clip")


def is_feature_map_cache(reader: ActivationCache) -> bool:
    """True when every stored layer is a CNN feature map; UniptError when the cache mixes both kinds."""
    grids = [reader.layer_spec(layer).grid for layer in reader.layers]
    if all(g is None for g in grids):
        return False
    if all(g is not None for g in grids):
        return True
    raise UniptError(
        f"cache {reader.source} mixes feature-map and token layers; UniPT needs one kind, re-extract"
    )


def build_model(
    variant: Variant | str, reader: ActivationCache, config: TrainConfig, num_outputs: int | None = None
) -> nn.Module:
    """The UniPT model for ``variant`` over every layer of ``reader``; ``forward(hidden, mask)`` gives
    ``(outputs, layer_weights)`` for the batches :class:`train.loader.CacheBatches` yields.

    ``num_outputs``: the head's width (the task's: 1 for regression); default one per class name.
    """
    if variant not in VARIANTS:
        raise UniptError(f"unknown train.variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    layers = reader.layers
    widths = [reader.hidden_sizes[layer] for layer in layers]
    num_classes = len(reader.label_names) if num_outputs is None else num_outputs
    maps = is_feature_map_cache(reader)
    if config.method != "unipt":
        if maps:
            raise UniptError(
                f"train.method {config.method!r} reads token sequences, but cache {reader.source} holds CNN "
                "feature maps; use train.method: unipt with train.variant: cnn"
            )
        return build_method(config.method, widths, num_classes, config)
    if maps and variant != "cnn":
        raise UniptError(
            f"train.variant {variant!r} needs token sequences, but cache {reader.source} holds CNN "
            "feature maps; set train.variant: cnn"
        )
    if not maps and variant == "cnn":
        raise UniptError(
            f"train.variant 'cnn' needs CNN feature maps, but cache {reader.source} holds token sequences; "
            "set train.variant: transformer (or clip4clip)"
        )

    if variant == "cnn":
        grids = [tuple(reader.layer_spec(layer).grid) for layer in layers]
        try:
            stride_ratios(grids)
        except ValueError as exc:
            shown = ", ".join(f"{layer}: {h}x{w}" for layer, (h, w) in zip(layers, grids, strict=True))
            suggestion = _stages_that_fit(layers, grids)
            raise UniptError(
                f"train.variant 'cnn' cannot use these stages (layer: grid {shown}): every grid must be an "
                f"integer multiple of the last stage's; pick other backbone.layers{suggestion}"
            ) from exc
        return UniPTCNNClassifier(
            widths,
            grids,
            num_classes,
            embed_size=config.embed_size or widths[-1],
            downsample_factor=config.downsample_factor,
            dropout=config.dropout,
        )
    if variant == "clip4clip":
        if config.embed_size not in (None, widths[-1]):
            raise UniptError(
                f"train.variant 'clip4clip' adds its output back to the last layer, so its width is that "
                f"layer's ({widths[-1]}); remove train.embed_size (it is {config.embed_size})"
            )
        return UniPTClip4ClipClassifier(
            widths, num_classes, downsample_factor=config.downsample_factor, dropout=config.dropout
        )
    return UniPTClassifier(
        widths,
        num_classes=num_classes,
        embed_size=config.embed_size or widths[-1],
        downsample_factor=config.downsample_factor,
        dropout=config.dropout,
    )


def _stages_that_fit(layers: list[int], grids: list[tuple[int, int]]) -> str:
    """A suggestion for the CNN variant: the longest run of stages whose grids are integer multiples of
    its last stage's (``, e.g. [0, 1, 2]``), or nothing if no two stages fit together."""
    best: list[int] = []
    for end in range(len(layers)):
        last_h, last_w = grids[end]
        fit = [
            layer
            for layer, (h, w) in zip(layers[: end + 1], grids[: end + 1], strict=True)
            if h >= last_h and w >= last_w and h % last_h == 0 and w % last_w == 0
        ]
        if len(fit) >= max(2, len(best)):
            best = fit
    return f", e.g. {best} (every stage whose grid is a multiple of the last one's)" if best else ""
