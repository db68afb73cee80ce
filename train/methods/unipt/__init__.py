"""UniPT (Diao et al., CVPR 2024) and its variants, one module each, chosen by ``train.variant``:

- ``transformer`` (:mod:`.transformer`): the paper's network over token sequences;
- ``cnn`` (:mod:`.cnn`): over CNN feature maps, whose stage grids must be integer multiples of the last
  stage's;
- ``clip4clip`` (:mod:`.clip4clip`): the official CLIP4Clip form, its output added back to the last layer.

:func:`build` is the ``unipt`` entry of the method registry (:mod:`unipt.train.methods`): it checks the
variant against the cache it will read and builds the variant's classifier from the table :data:`VARIANTS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from unipt.pipeline.config import TrainConfig
from unipt.pipeline.errors import UniptError
from unipt.train.methods.registry import CacheShape, is_feature_map_cache
from unipt.train.methods.unipt.clip4clip import UniPTClip4ClipClassifier
from unipt.train.methods.unipt.cnn import UniPTCNNClassifier, stride_ratios
from unipt.train.methods.unipt.transformer import UniPTClassifier


@dataclass(frozen=True)
class Variant:
    """One UniPT variant: whether it reads CNN feature maps (else token sequences), what to set instead
    when the cache holds the other kind, and its builder ``(shape, widths, num_outputs, config)``."""

    feature_maps: bool
    otherwise: str
    build: Callable[[CacheShape, list[int], int, TrainConfig], nn.Module]


def _transformer(shape: CacheShape, widths: list[int], num_outputs: int, config: TrainConfig) -> nn.Module:
    return UniPTClassifier(
        widths,
        num_classes=num_outputs,
        embed_size=config.embed_size or widths[-1],
        downsample_factor=config.downsample_factor,
        dropout=config.dropout,
    )


def _cnn(shape: CacheShape, widths: list[int], num_outputs: int, config: TrainConfig) -> nn.Module:
    layers = shape.layers
    grids = [tuple(shape.layer_spec(layer).grid) for layer in layers]
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
        num_outputs,
        embed_size=config.embed_size or widths[-1],
        downsample_factor=config.downsample_factor,
        dropout=config.dropout,
    )


def _clip4clip(shape: CacheShape, widths: list[int], num_outputs: int, config: TrainConfig) -> nn.Module:
    if config.embed_size not in (None, widths[-1]):
        raise UniptError(
            f"train.variant 'clip4clip' adds its output back to the last layer, so its width is that "
            f"layer's ({widths[-1]}); remove train.embed_size (it is {config.embed_size})"
        )
    return UniPTClip4ClipClassifier(
        widths, num_outputs, downsample_factor=config.downsample_factor, dropout=config.dropout
    )


VARIANTS: dict[str, Variant] = {
    "transformer": Variant(False, "set train.variant: cnn", _transformer),
    "cnn": Variant(True, "set train.variant: transformer (or clip4clip)", _cnn),
    "clip4clip": Variant(False, "set train.variant: cnn", _clip4clip),
}


_KINDS = {True: "CNN feature maps", False: "token sequences"}  # by Variant.feature_maps


def build(shape: CacheShape, num_outputs: int, config: TrainConfig) -> nn.Module:
    """The UniPT of ``config.variant`` over every layer of ``shape``."""
    try:
        variant = VARIANTS[config.variant]
    except KeyError:
        raise UniptError(
            f"unknown train.variant {config.variant!r}; choose one of {', '.join(VARIANTS)}"
        ) from None
    if is_feature_map_cache(shape) != variant.feature_maps:
        needs, holds = _KINDS[variant.feature_maps], _KINDS[not variant.feature_maps]
        raise UniptError(
            f"train.variant {config.variant!r} needs {needs}, but cache {shape.source} holds {holds}; "
            f"{variant.otherwise}"
        )
    widths = [shape.hidden_sizes[layer] for layer in shape.layers]
    return variant.build(shape, widths, num_outputs, config)


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
