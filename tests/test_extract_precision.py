"""The backbone's compute precision: fp32 by default, torch.autocast when configured (the GPU path),
and the precision is part of the cache key because it changes the stored activations."""

from __future__ import annotations

import numpy as np
import pytest

from unipt.extract.backbones import HFTextBackbone
from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline.cache.identity import backbone_identity, cache_key, cache_key_fields
from unipt.pipeline.config import BackboneConfig, ExtractConfig
from unipt.pipeline.errors import UniptError

TEXTS = ["the film was great", "a very dull and tedious plot with weak actors", "superb"]


def test_bf16_autocast_stays_close_to_fp32_but_is_not_identical(tiny_bert_dir):
    exact = HFTextBackbone(BackboneLoadSpec(str(tiny_bert_dir))).encode(TEXTS, [0, 2], 32, 2, "float32")
    fast = HFTextBackbone(BackboneLoadSpec(str(tiny_bert_dir), autocast="bfloat16")).encode(
        TEXTS, [0, 2], 32, 2, "float32"
    )
    assert exact.lengths == fast.lengths
    last_exact, last_fast = exact.layers[2], fast.layers[2]
    assert last_fast.dtype == np.float32 and last_fast.shape == last_exact.shape
    assert not np.array_equal(last_exact, last_fast)
    # bf16 keeps 8 bits of mantissa: a few percent of the activations' scale, never more.
    assert np.abs(last_fast - last_exact).max() < 0.1 * np.abs(last_exact).max()


def test_fp16_autocast_needs_a_gpu(tiny_bert_dir):
    backbone = HFTextBackbone(BackboneLoadSpec(str(tiny_bert_dir), autocast="float16"))
    if backbone.device.type == "cuda":
        pytest.skip("a CUDA device is present: fp16 autocast is allowed there")
    with pytest.raises(UniptError, match="float16 needs a CUDA device; use bfloat16"):
        backbone.encode(TEXTS, [0], 32, 2)


def test_autocast_is_part_of_the_cache_key(tiny_bert_dir):
    config = BackboneConfig(name_or_path=str(tiny_bert_dir))
    identity = backbone_identity(config)
    keys = {
        setting: cache_key(cache_key_fields("fp", identity, config, ExtractConfig(autocast=setting)))
        for setting in ("none", "bfloat16", "float16")
    }
    assert len(set(keys.values())) == 3
    assert keys["none"] == cache_key(cache_key_fields("fp", identity, config, ExtractConfig()))
