"""Hugging Face vision encoders (tiny random ViT and CLIP vision built from configs): the rows encode()
returns are the model's own hidden states for each image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from unipt.extract.backbones import Backbone, HFTextBackbone, HFVisionBackbone, load_backbone
from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline.cache.identity import backbone_identity
from unipt.pipeline.config import BackboneConfig, DatasetConfig
from unipt.pipeline.data.images import image_array, make_image
from unipt.pipeline.data.table import load_dataset
from unipt.pipeline.errors import UniptError

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tiny_clip_vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-clip-vision")
    config = CLIPVisionConfig(**TINY, image_size=32, patch_size=8)
    CLIPVisionModel(config).eval().save_pretrained(path, safe_serialization=True)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return path


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full CLIP model (text and vision towers) with no image processor saved: the fallback path."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("tiny-clip")
    config = CLIPConfig(
        text_config={**TINY, "vocab_size": 99},
        vision_config={**TINY, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def images() -> list[dict]:
    """Four real MNIST digits (28x28 gray, as the dataset column gives them) and one random RGB image."""
    # 200 so every digit has training examples (loading refuses a class only val/test hold); 4 are used.
    ds = load_dataset(DatasetConfig(source="bundled:mnist_5k", limit=200))
    rgb = np.random.default_rng(0).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    return ds.table.column("image").to_pylist()[:4] + [make_image(rgb)]


def _rgb(image: dict) -> np.ndarray:
    array = image_array(image)
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array


def _reference_states(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(pixel_values=pixel_values, output_hidden_states=True).hidden_states


def _check_rows_are_hidden_states(backbone, model, pixels_of, images) -> None:
    """encode() rows, per image, == the model's hidden states for that image alone (fp32 exactly)."""
    layers = list(range(backbone.describe()["num_hidden_states"]))
    n = backbone.describe()["tokens_per_example"]
    fp32 = backbone.encode(images, layers, max_length=0, batch_size=2, dtype="float32")
    fp16 = backbone.encode(images, layers, max_length=0, batch_size=3, dtype="float16")
    assert fp32.lengths == fp16.lengths == [n] * len(images)
    for i, image in enumerate(images):
        states = _reference_states(model, pixels_of(image))
        for layer in layers:
            expected = states[layer][0].numpy()
            assert expected.shape == (n, 32)
            np.testing.assert_array_equal(fp32.layers[layer][i * n : (i + 1) * n], expected)  # bit for bit
            got16 = fp16.layers[layer][i * n : (i + 1) * n]
            assert got16.dtype == np.float16
            np.testing.assert_allclose(got16.astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_vit_rows_are_the_models_hidden_states(tiny_vit_dir, images):
    from transformers import AutoImageProcessor, ViTModel

    backbone = load_backbone(BackboneLoadSpec(str(tiny_vit_dir), device="cpu"))
    assert isinstance(backbone, HFVisionBackbone) and isinstance(backbone, Backbone)
    info = backbone.describe()
    assert info["input"] == "image" and info["model_type"] == "vit" and info["tokenizer"] is None
    assert info["num_hidden_states"] == 3 and info["hidden_sizes"] == {0: 32, 1: 32, 2: 32}
    assert info["tokens_per_example"] == (32 // 8) ** 2 + 1  # patches + CLS
    assert info["image_processor"] == "ViTImageProcessorPil" and "grids" not in info

    model = ViTModel.from_pretrained(tiny_vit_dir, use_safetensors=True).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_vit_dir)

    def pixels_of(image):
        return processor(_rgb(image), return_tensors="pt", input_data_format="channels_last")["pixel_values"]

    _check_rows_are_hidden_states(backbone, model, pixels_of, images)


def test_clip_vision_rows_are_the_models_hidden_states(tiny_clip_vision_dir, images):
    from transformers import AutoImageProcessor, CLIPVisionModel

    backbone = load_backbone(BackboneLoadSpec(str(tiny_clip_vision_dir), device="cpu"))
    info = backbone.describe()
    assert isinstance(backbone, HFVisionBackbone) and info["model_type"] == "clip_vision_model"
    assert info["num_hidden_states"] == 3 and info["tokens_per_example"] == 17
    model = CLIPVisionModel.from_pretrained(tiny_clip_vision_dir, use_safetensors=True).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_clip_vision_dir)

    def pixels_of(image):
        return processor(_rgb(image), return_tensors="pt", input_data_format="channels_last")["pixel_values"]

    _check_rows_are_hidden_states(backbone, model, pixels_of, images)


def test_full_clip_gives_its_vision_tower_with_config_preprocessing(tiny_clip_dir, images):
    from transformers import CLIPModel

    backbone = load_backbone(BackboneLoadSpec(str(tiny_clip_dir), device="cpu"))
    info = backbone.describe()
    assert isinstance(backbone, HFVisionBackbone) and info["model_type"] == "clip_vision_model"
    assert info["image_processor"] is None and info["image_size"] == [32, 32]
    tower = CLIPModel.from_pretrained(tiny_clip_dir, use_safetensors=True).eval().vision_model

    def pixels_of(image):  # the documented fallback: bilinear resize to image_size, [0, 1], mean = std = 0.5
        x = torch.from_numpy(_rgb(image).copy()).permute(2, 0, 1)[None].float() / 255.0
        x = torch.nn.functional.interpolate(
            x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True
        )
        return (x - 0.5) / 0.5

    _check_rows_are_hidden_states(backbone, tower, pixels_of, images)


def test_inputs_of_the_wrong_kind_are_one_clear_error(tiny_vit_dir, tiny_bert_dir, images):
    vision = load_backbone(BackboneLoadSpec(str(tiny_vit_dir), device="cpu"))
    with pytest.raises(UniptError, match="takes images, but got text"):
        vision.encode(["a sentence"], [0], 0, 4)
    with pytest.raises(UniptError, match=r"layers \[3\] out of range"):
        vision.encode(images, [0, 3], 0, 4)
    text = load_backbone(BackboneLoadSpec(str(tiny_bert_dir), device="cpu"))
    assert isinstance(text, HFTextBackbone) and text.describe()["input"] == "text"
    with pytest.raises(UniptError, match="text encoder, but the inputs are neither texts"):
        text.encode(images, [0], 16, 4)


def test_vision_folder_identity_covers_the_image_processor(tiny_vit_dir, tmp_path):
    import shutil

    ident = backbone_identity(BackboneConfig(name_or_path=str(tiny_vit_dir)))
    assert ident.tokenizer_sha256 != "none"  # preprocessor_config.json is hashed with the tokenizer files
    other = tmp_path / "vit-other-processor"
    shutil.copytree(tiny_vit_dir, other)
    config = other / "preprocessor_config.json"
    config.write_text(config.read_text().replace('"height": 32', '"height": 31'))
    changed = backbone_identity(BackboneConfig(name_or_path=str(other)))
    assert (
        changed.weights_sha256 == ident.weights_sha256 and changed.tokenizer_sha256 != ident.tokenizer_sha256
    )
