"""Frozen backbones that return every hidden state, per example: text encoders, vision encoders, a CNN.

Imported only inside extraction workers: it pulls in ``torch`` model code (and, lazily, ``transformers``).

A backbone family is one module (``matches(spec, hf_config) -> bool`` and a class built from the
spec) plus one :func:`register_backbone_family` line below. ``load_backbone(spec)`` tries the families
in order and the first that matches wins:

- ``efficientnet-lite0``: ``bundled:efficientnet-lite0`` -> :class:`EfficientNetLite0Backbone`
  (per-stage CNN feature maps; matched on the name, no Hugging Face config);
- ``hf-vision``: a Hugging Face model whose config is a vision encoder (ViT, DeiT, BEiT, DINOv2,
  CLIP/SigLIP vision, or the vision tower of a full CLIP/SigLIP model) -> :class:`HFVisionBackbone`;
- ``hf-text``: any other Hugging Face model -> :class:`HFTextBackbone` (BERT/RoBERTa/MiniLM, T5's
  encoder, ...); the catch-all, so new families go before it.

Every backbone has ``input_kind`` (``"text"`` or ``"image"``), ``describe()`` and ``encode(inputs,
layers, max_length, batch_size, dtype)``; see :class:`Backbone`. What a backbone *is* for the cache key
(weights/config/tokenizer hashes) is computed in the driver, without this package:
``unipt.pipeline.cache.identity.backbone_identity``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from unipt.extract.backbones import cnn, hf_text, hf_vision
from unipt.extract.backbones.base import Backbone, EncodedShard, load_hf_config
from unipt.extract.backbones.cnn import EfficientNetLite0Backbone
from unipt.extract.backbones.hf_text import HFTextBackbone
from unipt.extract.backbones.hf_vision import VISION_MODEL_TYPES, HFVisionBackbone, is_vision_config
from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline.errors import UniptError

__all__ = [
    "VISION_MODEL_TYPES",
    "Backbone",
    "BackboneFamily",
    "EfficientNetLite0Backbone",
    "EncodedShard",
    "HFTextBackbone",
    "HFVisionBackbone",
    "backbone_families",
    "is_vision_config",
    "load_backbone",
    "register_backbone_family",
]


@dataclass(frozen=True)
class BackboneFamily:
    """One kind of backbone: how to recognise its models and how to load one.

    ``matches(spec, hf_config)`` gets the model's Hugging Face ``AutoConfig`` when ``needs_hf_config``,
    else None (for models that are not Hugging Face folders; such families are asked before any config
    is read). ``load(spec)`` builds the :class:`Backbone`.
    """

    name: str
    matches: Callable[[BackboneLoadSpec, Any | None], bool]
    load: Callable[[BackboneLoadSpec], Backbone]
    needs_hf_config: bool = True


_FAMILIES: list[BackboneFamily] = []


def register_backbone_family(family: BackboneFamily, before: str | None = None) -> None:
    """Add ``family`` to the registry: last, or just before the family named ``before``."""
    names = [f.name for f in _FAMILIES]
    if family.name in names:
        raise UniptError(f"backbone family {family.name!r} is already registered; give it another name")
    if before is None:
        _FAMILIES.append(family)
    elif before in names:
        _FAMILIES.insert(names.index(before), family)
    else:
        raise UniptError(f"no backbone family {before!r} to register {family.name!r} before; one of {names}")


def backbone_families() -> list[BackboneFamily]:
    """The registered families, in the order ``load_backbone`` tries them."""
    return list(_FAMILIES)


def load_backbone(spec: BackboneLoadSpec) -> Backbone:
    """The backbone ``spec`` names, loaded by the first family that matches (see the module docstring)."""
    hf_config: Any = None
    config_read = False
    for family in _FAMILIES:
        if family.needs_hf_config and not config_read:
            # Read once, and only when a family needs it: a bundled CNN never touches transformers.
            hf_config, config_read = load_hf_config(spec), True
        if family.matches(spec, hf_config if family.needs_hf_config else None):
            return family.load(spec)
    raise UniptError(
        f"no backbone family takes {spec.name_or_path!r} (tried {[f.name for f in _FAMILIES]}); "
        "register one with unipt.extract.backbones.register_backbone_family"
    )


# The order is the order of the tries: name-matched families first, the hf-text catch-all last.
register_backbone_family(BackboneFamily("efficientnet-lite0", cnn.matches, EfficientNetLite0Backbone, False))
register_backbone_family(BackboneFamily("hf-vision", hf_vision.matches, HFVisionBackbone))
register_backbone_family(BackboneFamily("hf-text", hf_text.matches, HFTextBackbone))
