"""What every backbone family shares: the :class:`Backbone` protocol, :class:`EncodedShard`, and the
helpers around a forward pass (device, autocast, host <-> device copies, argument checks, Hugging Face
loading shared by the text and vision families).

Imported only inside extraction workers (it imports ``torch``); ``transformers`` is imported lazily, by
the functions that need it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline.cuda_support import warn_if_emulated_bf16
from unipt.pipeline.data.bundled import bundled_model_path, is_bundled
from unipt.pipeline.errors import UniptError

_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


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
    # Positions of inputs that tokenized to nothing but special or unknown tokens (text encoders).
    no_content: list[int] = field(default_factory=list)


@runtime_checkable
class Backbone(Protocol):
    """What an extraction worker needs from a frozen backbone.

    ``describe()`` returns at least: ``model_type``; ``input`` (``"text"`` or ``"image"``: which dataset
    column ``encode`` takes); ``num_hidden_states``; ``hidden_sizes`` ``{index: width}``; ``tokenizer``
    (class name, or None for image backbones). Image token encoders add ``tokens_per_example``;
    feature-map backbones add ``grids`` ``{index: [H, W]}`` (at their fixed input size).

    ``encode(inputs, layers, max_length, batch_size, dtype)`` takes ``table.column(describe()["input"])
    .to_pylist()`` (strings, or image dicts from ``unipt.pipeline.data.images``; for a
    text-pair table, ``(text, text_pair)`` tuples: ``unipt.pipeline.data.table.backbone_inputs``) and
    returns the requested hidden states of every input, cast to ``dtype`` (``float16`` or ``float32``).
    Text backbones also take ``token_noise`` (one augmented view's input hash or None per text,
    :mod:`unipt.extract.augment`); image inputs are augmented by the worker before ``encode``.
    """

    input_kind: str

    def describe(self) -> dict[str, Any]: ...

    def encode(
        self, inputs: list, layers: list[int], max_length: int, batch_size: int, dtype: str = "float16"
    ) -> EncodedShard: ...


# --- the forward pass ----------------------------------------------------------------------------------


def device_for(spec: BackboneLoadSpec) -> torch.device:
    """The configured device; ``auto`` is the GPU when there is one."""
    auto_device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(auto_device if spec.device == "auto" else spec.device)


def autocast(device: torch.device, setting: str) -> contextlib.AbstractContextManager:
    """The forward pass's precision: fp32 as the model is, or torch.autocast when configured."""
    if setting == "none":
        return contextlib.nullcontext()
    if setting not in _AUTOCAST:
        raise UniptError(f"extract.autocast must be none, bfloat16 or float16, not {setting!r}")
    if device.type == "cpu" and setting == "float16":
        raise UniptError("extract.autocast float16 needs a CUDA device; use bfloat16 (or none) on CPU")
    if device.type == "cuda" and setting == "bfloat16":
        warn_if_emulated_bf16("extract.autocast", device)
    return torch.autocast(device.type, dtype=_AUTOCAST[setting])


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device; through pinned memory and without blocking the host when the device is a GPU."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def to_host(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
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


def check_dtype(dtype: str) -> torch.dtype:
    """The torch dtype ``encode`` casts to; only the two a worker computes in."""
    if dtype not in _TORCH_DTYPES:
        raise UniptError(f"backbones compute in {sorted(_TORCH_DTYPES)}, not {dtype!r}")
    return _TORCH_DTYPES[dtype]


def check_layers(layers: list[int], num_hidden_states: int) -> None:
    bad = [layer for layer in layers if not 0 <= layer < num_hidden_states]
    if bad or not layers:
        raise UniptError(
            f"layers {bad or '[]'} out of range: this backbone has hidden states 0..{num_hidden_states - 1}"
        )


# --- fixed-size image inputs ---------------------------------------------------------------------------


def resize_and_normalize(
    array: np.ndarray, size: tuple[int, ...], mean: float | torch.Tensor, std: float | torch.Tensor
) -> torch.Tensor:
    """One ``[H, W, C]`` uint8 image as ``[C, *size]`` float32: to [0, 1], bilinear resize (antialiased),
    then ``(x - mean) / std``."""
    x = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].to(torch.float32) / 255.0
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (x[0] - mean) / std


def encode_batches(
    inputs: list,
    layers: list[int],
    batch_size: int,
    dtype: torch.dtype,
    forward: Callable[[list], Sequence[torch.Tensor] | Mapping[int, torch.Tensor]],
    rows: Callable[[torch.Tensor], torch.Tensor],
) -> dict[int, np.ndarray]:
    """``inputs`` in batches through ``forward`` (its states, indexable by layer), each requested state
    cast to ``dtype`` on the host, flattened by ``rows`` to ``[rows, width]`` and packed in input order.
    For backbones whose every input gives the same shape (images at a fixed size)."""
    parts: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for start in range(0, len(inputs), batch_size):
        states = forward(inputs[start : start + batch_size])
        for layer, h in zip(layers, to_host([states[layer] for layer in layers], dtype), strict=True):
            parts[layer].append(rows(h).numpy())
    return {layer: np.concatenate(chunks, axis=0) for layer, chunks in parts.items()}


# --- Hugging Face models (the text and vision families) --------------------------------------------------


def quiet_transformers() -> None:
    """No download bars and no info-level warnings from ``transformers`` in the worker logs."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def hf_source(spec: BackboneLoadSpec) -> str:
    """What ``from_pretrained`` takes: the bundled folder for ``bundled:`` names, else the name or path."""
    return str(bundled_model_path(spec.name_or_path)) if is_bundled(spec.name_or_path) else spec.name_or_path


def load_hf_config(spec: BackboneLoadSpec) -> Any:
    """The model's ``AutoConfig``: what the Hugging Face families are matched on."""
    quiet_transformers()
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            hf_source(spec), revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except ValueError as exc:
        if spec.trust_remote_code or "trust_remote_code" not in str(exc):
            raise
        # transformers refuses (trust_remote_code=False is passed explicitly, so it never prompts):
        # say it in one line, naming the only switch that runs such code.
        raise UniptError(
            f"backbone {spec.name_or_path} ships its own Python code (its config.json has an auto_map) and "
            "unipt runs none unless asked; set backbone.trust_remote_code: true in your config (or pass "
            "--trust-remote-code to predict/evaluate), only for a source you trust"
        ) from exc


def load_dtype(spec: BackboneLoadSpec) -> torch.dtype | str:
    """The dtype a backbone's weights load in: float32 unless the config asks for autocast.

    transformers' default ("auto") keeps the checkpoint's dtype, so a model saved in fp16 would run fp16
    LayerNorm and softmax under ``extract.autocast: none``, which promises fp32. With autocast on, the
    checkpoint's dtype stays (autocast runs the precision-sensitive ops in fp32 either way).
    """
    return torch.float32 if spec.autocast == "none" else "auto"


def load_hf_model(spec: BackboneLoadSpec, source: str) -> Any:
    from transformers import AutoModel

    return AutoModel.from_pretrained(
        source,
        dtype=load_dtype(spec),
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
        # Safetensors only, unless the config opts in to pickles (then safetensors still win if present).
        use_safetensors=None if spec.allow_pickle else True,
        weights_only=True,  # a pickle may hold tensors and plain types only, never code
    )
