"""The method registry: ``train.method`` name -> the builder of its model over a cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import nn

from unipt.pipeline.cache.layout import LayerSpec
from unipt.pipeline.config import TrainConfig
from unipt.pipeline.errors import UniptError


class CacheShape(Protocol):
    """What a builder reads from a cache: an open cache, or a tuned model's ``model.json``
    (:class:`unipt.pipeline.model.predict._Shape`)."""

    source: str
    layers: list[int]
    hidden_sizes: dict[int, int]
    label_names: list[str]

    def layer_spec(self, layer: int) -> LayerSpec: ...


Builder = Callable[[CacheShape, int, TrainConfig], nn.Module]
_METHODS: dict[str, Builder] = {}


def register_method(name: str, build: Builder) -> None:
    if name in _METHODS:
        raise ValueError(f"method {name!r} is registered twice")
    _METHODS[name] = build


def registered_methods() -> tuple[str, ...]:
    return tuple(_METHODS)


def build_method(name: str, shape: CacheShape, num_outputs: int, config: TrainConfig) -> nn.Module:
    try:
        build = _METHODS[name]
    except KeyError:
        raise UniptError(f"unknown train.method {name!r}; choose one of {', '.join(_METHODS)}") from None
    return build(shape, num_outputs, config)


def is_feature_map_cache(shape: CacheShape) -> bool:
    """True when every stored layer is a CNN feature map; UniptError when the cache mixes both kinds."""
    grids = [shape.layer_spec(layer).grid for layer in shape.layers]
    if all(g is None for g in grids):
        return False
    if all(g is not None for g in grids):
        return True
    raise UniptError(
        f"cache {shape.source} mixes feature-map and token layers; UniPT needs one kind, re-extract"
    )


def on_tokens(name: str, build: Callable[[list[int], int, TrainConfig], nn.Module]) -> Builder:
    """A builder for a method that reads token sequences: ``build(widths, num_outputs, config)`` over every
    cached layer's width, refusing a cache of CNN feature maps."""

    def build_on_tokens(shape: CacheShape, num_outputs: int, config: TrainConfig) -> nn.Module:
        if is_feature_map_cache(shape):
            raise UniptError(
                f"train.method {name!r} reads token sequences, but cache {shape.source} holds CNN "
                "feature maps; use train.method: unipt with train.variant: cnn"
            )
        return build([shape.hidden_sizes[layer] for layer in shape.layers], num_outputs, config)

    return build_on_tokens
