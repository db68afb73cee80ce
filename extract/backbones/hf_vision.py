"""The Hugging Face vision family: image encoders with a fixed number of tokens per image (ViT, DeiT,
BEiT, DINOv2, CLIP/SigLIP vision, or the vision tower of a full CLIP/SigLIP model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from unipt.extract.backbones.base import (
    EncodedShard,
    autocast,
    check_dtype,
    check_layers,
    device_for,
    encode_batches,
    hf_source,
    load_hf_model,
    quiet_transformers,
    resize_and_normalize,
    to_device,
)
from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline.data.images import image_array
from unipt.pipeline.errors import UniptError

# Hugging Face model types treated as image encoders with a fixed number of tokens per image.
# Composite image-text types (clip, siglip, ...) contribute their vision tower.
VISION_MODEL_TYPES = frozenset(
    {
        "vit",
        "deit",
        "beit",
        "data2vec-vision",
        "dinov2",
        "dinov2_with_registers",
        "ijepa",
        "vit_msn",
        "clip_vision_model",
        "clip",
        "siglip_vision_model",
        "siglip",
    }
)


def is_vision_config(config: Any) -> bool:
    return getattr(config, "model_type", None) in VISION_MODEL_TYPES


def matches(spec: BackboneLoadSpec, hf_config: Any) -> bool:
    """A Hugging Face model whose config is one of :data:`VISION_MODEL_TYPES`."""
    return is_vision_config(hf_config)


class HFVisionBackbone:
    """A frozen Hugging Face image encoder (ViT, DeiT, BEiT, DINOv2, CLIP/SigLIP vision, ...).

    Hidden states are ``output_hidden_states=True``'s: the embeddings, then every layer, each
    ``[tokens, hidden]`` with the same number of tokens for every image (patches plus CLS and any
    distillation/register tokens), stored as token sequences. A full CLIP/SigLIP model contributes
    its vision tower.

    Preprocessing: the folder's image processor (``AutoImageProcessor``, i.e. its
    ``preprocessor_config.json``; needs Pillow) when it has one. Otherwise a fallback: bilinear
    resize (antialiased) to the config's ``image_size``, rescale to [0, 1], normalize with mean =
    std = 0.5 (ViT's defaults). Grayscale images are repeated to the model's channel count.
    ``max_length`` does not apply (the token count is fixed by the model); ``describe()`` reports it
    as ``tokens_per_example``.
    """

    input_kind = "image"

    def __init__(self, spec: BackboneLoadSpec) -> None:
        quiet_transformers()
        self.device = device_for(spec)
        self.autocast = spec.autocast
        source = hf_source(spec)
        model = load_hf_model(spec, source)
        config = model.config
        if getattr(config, "vision_config", None) is not None and hasattr(model, "vision_model"):
            model, config = model.vision_model, config.vision_config  # the vision tower of CLIP/SigLIP
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.config = config
        self.model_type = config.model_type
        size = config.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        self.num_channels = int(getattr(config, "num_channels", 3))
        self.processor = self._image_processor(spec, source)
        # One blank image gives the token count and widths the model really produces.
        blank = np.zeros((*self.image_size, self.num_channels), dtype=np.uint8)
        states = self._hidden_states([blank])
        self.num_hidden_states = len(states)
        self.tokens_per_example = int(states[0].shape[1])
        self.hidden_sizes = {i: int(h.shape[-1]) for i, h in enumerate(states)}

    def _image_processor(self, spec: BackboneLoadSpec, source: str) -> Any | None:
        local = Path(source)
        if local.is_dir() and not (local / "preprocessor_config.json").is_file():
            return None
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(
                source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
            )
        except OSError:  # a hub model without an image processor
            return None
        except ImportError as exc:  # the image processors need Pillow (or torchvision)
            reason = " ".join(str(exc).split())
            raise UniptError(
                f"cannot load the image processor of {spec.name_or_path}: {reason}; pip install pillow"
            ) from exc

    def describe(self) -> dict:
        return {
            "model_type": self.model_type,
            "input": self.input_kind,
            "num_hidden_states": self.num_hidden_states,
            "hidden_sizes": dict(self.hidden_sizes),
            "tokens_per_example": self.tokens_per_example,
            "image_size": list(self.image_size),
            "tokenizer": None,
            "image_processor": type(self.processor).__name__ if self.processor is not None else None,
        }

    def _rgb(self, image: Any) -> np.ndarray:
        array = image_array(image)
        if array.shape[2] == self.num_channels:
            return array
        if array.shape[2] == 1:
            return np.repeat(array, self.num_channels, axis=2)
        raise UniptError(f"a {array.shape[2]}-channel image for a {self.num_channels}-channel model")

    def pixel_values(self, images: list) -> torch.Tensor:
        """The model's input for ``images``: ``[N, C, H, W]`` float32."""
        arrays = [self._rgb(image) for image in images]
        if self.processor is not None:
            batch = self.processor(arrays, return_tensors="pt", input_data_format="channels_last")
            return batch["pixel_values"].to(torch.float32)
        return torch.stack([resize_and_normalize(array, self.image_size, 0.5, 0.5) for array in arrays])

    def _hidden_states(self, images: list) -> tuple[torch.Tensor, ...]:
        pixel_values = to_device(self.pixel_values(images), self.device)
        with torch.inference_mode(), autocast(self.device, self.autocast):
            outputs = self.model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        states = outputs.hidden_states
        if len({tuple(h.shape[:2]) for h in states}) != 1 or any(h.ndim != 3 for h in states):
            raise UniptError(
                f"{self.model_type}: hidden states are not one fixed-length token sequence per image "
                f"(shapes {[tuple(h.shape) for h in states]}); hierarchical vision models are not supported"
            )
        return states

    def encode(
        self, inputs: list, layers: list[int], max_length: int, batch_size: int, dtype: str = "float16"
    ) -> EncodedShard:
        """Every requested hidden state of every image, ``tokens_per_example`` rows each."""
        out_dtype = check_dtype(dtype)
        check_layers(layers, self.num_hidden_states)
        packed = encode_batches(
            inputs,
            layers,
            batch_size,
            out_dtype,
            forward=self._hidden_states,
            rows=lambda h: h.reshape(-1, h.shape[-1]),  # [N, tokens, hidden] -> [N*tokens, hidden]
        )
        return EncodedShard(lengths=[self.tokens_per_example] * len(inputs), layers=packed)
