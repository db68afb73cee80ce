"""The backbone family registry: ordered, first match wins, and a new family is one registration."""

from __future__ import annotations

import pytest

import unipt.extract.backbones as backbones
from unipt.extract.backbones import (
    BackboneFamily,
    EncodedShard,
    HFTextBackbone,
    HFVisionBackbone,
    backbone_families,
    load_backbone,
    register_backbone_family,
)
from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline.errors import UniptError


class _Fixed:
    """A minimal backbone: what a test family loads, so the pick is visible."""

    input_kind = "text"

    def __init__(self, spec: BackboneLoadSpec) -> None:
        self.spec = spec

    def describe(self) -> dict:
        return {"model_type": "fixed", "input": "text", "num_hidden_states": 1, "hidden_sizes": {0: 1}}

    def encode(self, inputs, layers, max_length, batch_size, dtype="float16") -> EncodedShard:
        raise NotImplementedError


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A private copy of the registry: what a test registers is gone afterwards."""
    monkeypatch.setattr(backbones, "_FAMILIES", backbone_families())


def test_built_in_families_are_tried_in_order():
    assert [f.name for f in backbone_families()] == ["efficientnet-lite0", "hf-vision", "hf-text"]
    assert [f.needs_hf_config for f in backbone_families()] == [False, True, True]


def test_a_registered_family_before_the_catch_all_is_picked(registry, tiny_bert_dir, tiny_vit_dir):
    bert = BackboneFamily("bert-only", lambda spec, config: config.model_type == "bert", _Fixed)
    register_backbone_family(bert, before="hf-text")
    assert [f.name for f in backbone_families()] == [
        "efficientnet-lite0",
        "hf-vision",
        "bert-only",
        "hf-text",
    ]
    picked = load_backbone(BackboneLoadSpec(str(tiny_bert_dir), device="cpu"))
    assert isinstance(picked, _Fixed) and picked.spec.name_or_path == str(tiny_bert_dir)
    # Families before it still win for their models.
    assert isinstance(load_backbone(BackboneLoadSpec(str(tiny_vit_dir), device="cpu")), HFVisionBackbone)


def test_first_match_wins_and_after_the_catch_all_is_never_reached(registry, tiny_bert_dir):
    register_backbone_family(BackboneFamily("too-late", lambda spec, config: True, _Fixed))
    assert backbone_families()[-1].name == "too-late"
    assert isinstance(load_backbone(BackboneLoadSpec(str(tiny_bert_dir), device="cpu")), HFTextBackbone)


def test_a_family_without_hf_config_is_asked_first_and_needs_no_model_folder(registry, tmp_path):
    seen = []

    def matches(spec, config):
        seen.append(config)
        return spec.name_or_path.startswith("fake:")

    register_backbone_family(
        BackboneFamily("fake", matches, _Fixed, needs_hf_config=False), before="hf-vision"
    )
    picked = load_backbone(BackboneLoadSpec("fake:model", device="cpu"))  # no folder, no hub: no config read
    assert isinstance(picked, _Fixed) and seen == [None]


def test_registration_refuses_duplicates_and_unknown_positions(registry):
    family = BackboneFamily("hf-text", lambda spec, config: True, _Fixed)
    with pytest.raises(UniptError, match="'hf-text' is already registered"):
        register_backbone_family(family)
    with pytest.raises(UniptError, match="no backbone family 'nope'"):
        register_backbone_family(BackboneFamily("new", lambda spec, config: True, _Fixed), before="nope")
    assert [f.name for f in backbone_families()] == ["efficientnet-lite0", "hf-vision", "hf-text"]
