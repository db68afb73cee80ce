"""Frozen-backbone methods other than UniPT that train on the same cache: one module each, registered
below (``train.method``). Each builds a model with UniPT's interface, ``forward(hidden, mask) ->
(outputs, layer_weights)``, over every cached layer, so every task, the loader, the fit loop, export and
predict take it unchanged. UniPT itself (``train.method: unipt``) is built by :mod:`train.models`.

Adding a method: a module with ``build(widths, num_outputs, config) -> nn.Module``, plus one
:func:`register_method` line here (and its name in ``TrainConfig.method``'s choices).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pipeline.config import TrainConfig
from pipeline.errors import UniptError
from train.methods import linear_probe, lst, scalar_mix

Builder = Callable[[list[int], int, TrainConfig], nn.Module]
_METHODS: dict[str, Builder] = {}


def register_method(name: str, build: Builder) -> None:
    if name in _METHODS or name == "unipt":
        raise ValueError(f"method {name!r} is registered twice")
    _METHODS[name] = build


def build_method(name: str, widths: list[int], num_outputs: int, config: TrainConfig) -> nn.Module:
    try:
        build = _METHODS[name]
    except KeyError:
        raise UniptError(
            f"unknown train.method {name!r}; choose unipt or one of {', '.join(_METHODS)}"
        ) from None
    return build(widths, num_outputs, config)


register_method("lst", lst.build)
register_method("scalar_mix", scalar_mix.build)
register_method("linear_probe", linear_probe.build)
