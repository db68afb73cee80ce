"""The methods that train on a cache, registered by their ``train.method`` name: UniPT (:mod:`.unipt`,
by ``train.variant``) and the frozen-backbone methods it is compared with, one module each. Each builds a
model with UniPT's interface, ``forward(hidden, mask) -> (outputs, layer_weights)``, over every cached
layer, so every task, the loader, the fit loop, export and predict take it unchanged.

Adding a method: a module with a builder, one :func:`register_method` line here, and its name in
:data:`unipt.pipeline.method_names.METHOD_NAMES` (where the config checks it without importing torch).
"""

from __future__ import annotations

from torch import nn

from unipt.pipeline.config import TrainConfig
from unipt.train.methods import linear_probe, lst, scalar_mix, unipt
from unipt.train.methods.registry import (
    CacheShape,
    build_method,
    is_feature_map_cache,
    on_tokens,
    register_method,
    registered_methods,
)

__all__ = [
    "CacheShape",
    "build_method",
    "build_model",
    "is_feature_map_cache",
    "register_method",
    "registered_methods",
]

register_method("unipt", unipt.build)
register_method("lst", on_tokens("lst", lst.build))
register_method("scalar_mix", on_tokens("scalar_mix", scalar_mix.build))
register_method("linear_probe", on_tokens("linear_probe", linear_probe.build))


def build_model(shape: CacheShape, config: TrainConfig, num_outputs: int | None = None) -> nn.Module:
    """The model ``config.method`` (and, for UniPT, ``config.variant``) names over every layer of
    ``shape``; ``forward(hidden, mask)`` gives ``(outputs, layer_weights)`` for the batches
    :class:`unipt.train.loader.CacheBatches` yields.

    ``num_outputs``: the head's width (the task's: 1 for regression); default one per class name.
    """
    num_outputs = len(shape.label_names) if num_outputs is None else num_outputs
    return build_method(config.method, shape, num_outputs, config)
