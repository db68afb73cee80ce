"""Frozen Hugging Face text encoders that return every hidden state, per example, unpadded.

Imported only inside extraction workers: it pulls in ``transformers``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from extract.spec import BackboneLoadSpec
from pipeline.bundled import bundled_model_path, is_bundled

_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class EncodedShard:
    """A shard's tokens, packed: ``layers[l]`` is [sum(lengths), hidden_l] in example order."""

    lengths: list[int]
    layers: dict[int, np.ndarray]


class HFTextBackbone:
    """A frozen encoder from ``from_pretrained``: any BERT/RoBERTa/MiniLM-style model, or a T5 encoder."""

    def __init__(self, spec: BackboneLoadSpec) -> None:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        auto_device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto_device if spec.device == "auto" else spec.device)
        source = (
            str(bundled_model_path(spec.name_or_path)) if is_bundled(spec.name_or_path) else spec.name_or_path
        )
        self.tokenizer = AutoTokenizer.from_pretrained(
            source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
        model = AutoModel.from_pretrained(
            source,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            use_safetensors=True,  # never unpickle weights from a model folder
        )
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()  # T5-style: the encoder alone gives the hidden states
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.config = model.config

    @property
    def num_hidden_states(self) -> int:
        return int(self.config.num_hidden_layers) + 1  # embeddings + every layer

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.config, "hidden_size", None) or self.config.d_model)

    def describe(self) -> dict:
        return {
            "model_type": self.config.model_type,
            "num_hidden_states": self.num_hidden_states,
            "hidden_sizes": {i: self.hidden_size for i in range(self.num_hidden_states)},
            "tokenizer": type(self.tokenizer).__name__,
        }

    @torch.inference_mode()
    def encode(
        self, texts: list[str], layers: list[int], max_length: int, batch_size: int, dtype: str = "float16"
    ) -> EncodedShard:
        """Every requested hidden state for every text, real tokens only, cast to ``dtype``."""
        encoded = self.tokenizer(texts, truncation=True, max_length=max_length)
        ids = encoded["input_ids"]
        lengths = [len(x) for x in ids]
        # Batching by length keeps padding (wasted compute) small; the order is deterministic.
        order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
        per_example: list[dict[int, np.ndarray] | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            batch_idx = order[start : start + batch_size]
            features = self.tokenizer.pad(
                {key: [encoded[key][i] for i in batch_idx] for key in encoded.keys()}, return_tensors="pt"
            )
            features = {k: v.to(self.device) for k, v in features.items()}
            outputs = self.model(**features, output_hidden_states=True, return_dict=True)
            hidden = [outputs.hidden_states[layer].to("cpu", _TORCH_DTYPES[dtype]) for layer in layers]
            for row, example in enumerate(batch_idx):
                n = lengths[example]
                per_example[example] = {
                    layer: h[row, :n].numpy() for layer, h in zip(layers, hidden, strict=True)
                }
        packed = {layer: np.concatenate([ex[layer] for ex in per_example], axis=0) for layer in layers}
        return EncodedShard(lengths=lengths, layers=packed)
