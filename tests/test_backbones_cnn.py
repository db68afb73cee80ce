"""The real ImageNet EfficientNet-Lite0 (from PyPI) on real MNIST-5k digits: per-stage maps by hooks."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from unipt.extract.backbones import Backbone, EfficientNetLite0Backbone, load_backbone
from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline.cache.identity import backbone_identity
from unipt.pipeline.config import BackboneConfig, DatasetConfig
from unipt.pipeline.data.bundled import bundled_cnn_settings, bundled_model_path
from unipt.pipeline.data.table import load_dataset
from unipt.pipeline.errors import UniptError
from unipt.pipeline.hashing import sha256_file, sha256_json

pytestmark = pytest.mark.slow

NAME = "bundled:efficientnet-lite0"
# At the 112x112 input: (channels, grid) of stem, the seven MBConv stages, and the 1x1 head.
STAGES = {
    0: (32, [56, 56]),
    1: (16, [56, 56]),
    2: (24, [28, 28]),
    3: (40, [14, 14]),
    4: (80, [7, 7]),
    5: (112, [7, 7]),
    6: (192, [4, 4]),
    7: (320, [4, 4]),
    8: (1280, [4, 4]),
}
ALL = list(STAGES)


@pytest.fixture(scope="module")
def backbone() -> EfficientNetLite0Backbone:
    return load_backbone(BackboneLoadSpec(NAME, device="cpu"))


@pytest.fixture(scope="module")
def digits() -> list[dict]:
    # A sample large enough that every digit has training examples (a 5-example sample may not, and
    # loading refuses a class that only val/test hold); the tests need 5 images.
    ds = load_dataset(DatasetConfig(source="bundled:mnist_5k", limit=200))
    return ds.table.column("image").to_pylist()[:5]


def test_describe_gives_stage_widths_and_grids(backbone):
    assert isinstance(backbone, EfficientNetLite0Backbone) and isinstance(backbone, Backbone)
    info = backbone.describe()
    assert info["input"] == "image" and info["model_type"] == "efficientnet-lite0"
    assert info["num_hidden_states"] == 9 and info["tokenizer"] is None and info["image_size"] == [112, 112]
    assert info["hidden_sizes"] == {i: c for i, (c, _) in STAGES.items()}
    assert info["grids"] == {i: g for i, (_, g) in STAGES.items()}
    assert info["stage_names"][0] == "stem" and info["stage_names"][8] == "head"


def test_real_imagenet_weights_are_loaded_tensors_only(backbone):
    state = torch.load(bundled_model_path(NAME), map_location="cpu", weights_only=True)
    model_state = backbone.model.state_dict()
    assert set(state) == set(model_state)
    for name in ("_conv_stem.weight", "_blocks.15._project_conv.weight", "_fc.bias"):
        assert torch.equal(model_state[name], state[name])


def test_hooks_catch_each_stage_output(backbone, digits):
    """The hooked maps are what the network computes: stem by hand, blocks in turn, the head's features."""
    maps = backbone.feature_maps(digits[:3], ALL)
    for index, (channels, grid) in STAGES.items():
        assert tuple(maps[index].shape) == (3, channels, *grid)
    model = backbone.model
    x = backbone.pixel_values(digits[:3])
    assert tuple(x.shape) == (3, 3, 112, 112)
    # EfficientNet-Lite0's seven stages repeat their block 1, 2, 2, 3, 3, 4, 1 times (16 blocks).
    last_block_of_stage = {0: 1, 2: 2, 4: 3, 7: 4, 10: 5, 14: 6, 15: 7}
    assert len(model._blocks) == 16
    with torch.no_grad():
        h = model._swish(model._bn0(model._conv_stem(x)))
        torch.testing.assert_close(maps[0], h, rtol=0, atol=0)
        for i, block in enumerate(model._blocks):
            h = block(h)
            if i in last_block_of_stage:
                torch.testing.assert_close(maps[last_block_of_stage[i]], h, rtol=0, atol=0)
        torch.testing.assert_close(maps[8], model.extract_features(x), rtol=0, atol=0)


def test_encode_rows_are_hook_maps_as_hw_rows_of_channels(backbone, digits):
    encoded = backbone.encode(digits, ALL, max_length=0, batch_size=2, dtype="float32")
    assert encoded.lengths is None  # feature maps only: the grids fix the rows per example
    for index, (channels, (h, w)) in STAGES.items():
        rows = encoded.layers[index]
        assert rows.shape == (len(digits) * h * w, channels) and rows.dtype == np.float32
    for start in range(0, len(digits), 2):  # the same batches encode() ran: bit for bit
        maps = backbone.feature_maps(digits[start : start + 2], ALL)
        for index, (channels, (h, w)) in STAGES.items():
            for j in range(maps[index].shape[0]):
                i = start + j
                expected = maps[index][j].permute(1, 2, 0).reshape(h * w, channels).numpy()
                got = encoded.layers[index][i * h * w : (i + 1) * h * w]
                np.testing.assert_array_equal(got, expected)
                # Row r is position (r // W, r % W) of the [C, H, W] map.
                np.testing.assert_array_equal(got[w + 1], maps[index][j, :, 1, 1].numpy())
    # One image alone gives the same maps up to float rounding (other batch shapes, other kernels).
    alone = backbone.feature_maps(digits[4:5], ALL)
    for index, (channels, (h, w)) in STAGES.items():
        expected = alone[index][0].permute(1, 2, 0).reshape(h * w, channels).numpy()
        got = encoded.layers[index][4 * h * w : 5 * h * w]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_encode_is_deterministic_and_layer_selection_is_by_index(backbone, digits):
    a = backbone.encode(digits, [0, 3, 8], 0, batch_size=5, dtype="float32")
    b = backbone.encode(digits, [0, 3, 8], 0, batch_size=5, dtype="float32")
    for layer in (0, 3, 8):
        np.testing.assert_array_equal(a.layers[layer], b.layers[layer])
    only = backbone.encode(digits, [3], 0, batch_size=5, dtype="float32")  # stops after stage 3
    assert list(only.layers) == [3]
    np.testing.assert_array_equal(only.layers[3], a.layers[3])
    half = backbone.encode(digits, [3], 0, batch_size=5, dtype="float16")
    np.testing.assert_array_equal(half.layers[3], a.layers[3].astype(np.float16))
    with pytest.raises(UniptError, match=r"layers \[9\] out of range: this backbone has hidden states 0..8"):
        backbone.encode(digits, [9], 0, 4)
    with pytest.raises(UniptError, match="takes images, but got text"):
        backbone.encode(["a sentence"], [0], 0, 4)


def test_preprocessing_gray_to_rgb_resize_imagenet_normalization(backbone, digits):
    x = backbone.pixel_values(digits[:1])[0]
    gray = np.frombuffer(digits[0]["pixels"], dtype=np.uint8).reshape(28, 28)
    # The three channels are one gray image, each normalized with its ImageNet mean/std.
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    unnormalized = [x[c] * std[c] + mean[c] for c in range(3)]
    torch.testing.assert_close(unnormalized[0], unnormalized[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(unnormalized[0], unnormalized[2], rtol=0, atol=1e-5)
    # Bright strokes stay bright: a 4x bilinear upscale keeps the mean intensity.
    assert abs(float(unnormalized[0].mean()) - gray.mean() / 255) < 0.01


def test_identity_hashes_the_weight_file_and_settings(tiny_bert_dir):
    ident = backbone_identity(BackboneConfig(name_or_path=NAME))
    assert ident.weights_sha256 == sha256_file(bundled_model_path(NAME))
    assert ident.config_sha256 == sha256_json(bundled_cnn_settings(NAME))
    assert ident.tokenizer_sha256 == "none" and ident.name == NAME
    assert backbone_identity(BackboneConfig(name_or_path=NAME)) == ident
    hf = backbone_identity(BackboneConfig(name_or_path=str(tiny_bert_dir)))  # HF folders are unchanged
    assert hf.tokenizer_sha256 != "none" and hf.weights_sha256 != ident.weights_sha256


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_weight_file_that_is_not_plain_tensors_is_refused(tmp_path, monkeypatch, capsys):
    evil = tmp_path / "efficientnet-lite0.pth"
    with open(evil, "wb") as handle:
        pickle.dump({"_conv_stem.weight": _Payload()}, handle, protocol=2)
    monkeypatch.setattr("unipt.extract.backbones.cnn.bundled_model_path", lambda name: evil)
    with pytest.raises(
        UniptError, match="cannot load EfficientNet-Lite0 weights from .*efficientnet-lite0.pth"
    ):
        EfficientNetLite0Backbone(BackboneLoadSpec(NAME, device="cpu"))
    assert "this must never run" not in capsys.readouterr().out  # weights_only: nothing was executed
