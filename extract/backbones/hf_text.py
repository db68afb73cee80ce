"""The Hugging Face text family: any BERT/RoBERTa/MiniLM-style encoder, or the encoder of a T5-style model.

It is the catch-all of the registry (``unipt.extract.backbones``): every Hugging Face model that no earlier
family takes.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from unipt.extract.augment import noise_encoding
from unipt.extract.backbones.base import (
    EncodedShard,
    autocast,
    check_dtype,
    check_layers,
    device_for,
    hf_source,
    load_hf_model,
    quiet_transformers,
    to_device,
    to_host,
)
from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline.errors import UniptError


def matches(spec: BackboneLoadSpec, hf_config: Any) -> bool:
    """Every Hugging Face model (this family is tried last)."""
    return True


class HFTextBackbone:
    """A frozen encoder from ``from_pretrained``: any BERT/RoBERTa/MiniLM-style model, or a T5 encoder."""

    input_kind = "text"

    def __init__(self, spec: BackboneLoadSpec) -> None:
        quiet_transformers()
        from transformers import AutoTokenizer

        self.device = device_for(spec)
        self.autocast = spec.autocast
        source = hf_source(spec)
        self.tokenizer = AutoTokenizer.from_pretrained(
            source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
        model = load_hf_model(spec, source)
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()  # T5-style: the encoder alone gives the hidden states
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.config = model.config
        # Tokenizers may return inputs the model does not name (token_type_ids for a T5 encoder, which
        # would vanish into its **kwargs): pass only named inputs, unless the forward names none.
        parameters = inspect.signature(self.model.forward).parameters
        named = {name for name, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        self._accepts = named if "input_ids" in named else None
        # Random replacement tokens must have an embedding: the smaller of tokenizer and model vocabularies.
        vocab = len(self.tokenizer)
        self._vocab_size = min(vocab, int(getattr(self.config, "vocab_size", vocab)))

    @property
    def num_hidden_states(self) -> int:
        return int(self.config.num_hidden_layers) + 1  # embeddings + every layer

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.config, "hidden_size", None) or self.config.d_model)

    def _tokenize(self, texts: list, max_length: int) -> Any:
        if texts and all(isinstance(x, tuple) and len(x) == 2 for x in texts):
            firsts, seconds = (list(part) for part in zip(*texts, strict=True))
            if all(isinstance(text, str) for text in firsts + seconds):
                try:
                    return self.tokenizer(firsts, seconds, truncation=True, max_length=max_length)
                except Exception as exc:  # a tokenizer with no pair template, or pairs that cannot fit
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise UniptError(
                        f"tokenizer {type(self.tokenizer).__name__} cannot encode text pairs to "
                        f"{max_length} tokens ({reason}); raise backbone.max_length or use a backbone whose "
                        "tokenizer takes pairs (BERT-style)"
                    ) from exc
        if any(not isinstance(text, str) for text in texts):
            raise UniptError(
                "this backbone is a text encoder, but the inputs are neither texts nor (text, text_pair) "
                "pairs (an image dataset?)"
            )
        return self.tokenizer(texts, truncation=True, max_length=max_length)

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
        self,
        texts: list[str],
        layers: list[int],
        max_length: int,
        batch_size: int,
        dtype: str = "float16",
        token_noise: list[str | None] | None = None,
    ) -> EncodedShard:
        """Every requested hidden state for every text, real tokens only, cast to ``dtype``. ``texts``
        may instead be ``(text, text_pair)`` tuples, encoded as the tokenizer encodes pairs (its segment
        ids; truncation ``longest_first``, the longer text cut first).

        ``token_noise`` (one entry per text) gives the augmented views: a text with a view hash is
        encoded with that view's token noise (:func:`unipt.extract.augment.noise_encoding`), after truncation.
        """
        out_dtype = check_dtype(dtype)
        check_layers(layers, self.num_hidden_states)
        encoded = self._tokenize(texts, max_length)
        truncated = _count_truncated(encoded, max_length)
        special = set(self.tokenizer.all_special_ids)
        if token_noise is not None and any(view is not None for view in token_noise):
            mask_id = self.tokenizer.mask_token_id
            encoded = noise_encoding(dict(encoded), token_noise, special, mask_id, self._vocab_size)
        keys = [k for k in encoded.keys() if self._accepts is None or k in self._accepts]
        ids = encoded["input_ids"]
        lengths = [len(x) for x in ids]
        per_example: list[dict[int, np.ndarray] | None] = [None] * len(texts)
        for batch_idx in same_padding_batches(lengths, batch_size, max_length):
            features = self.tokenizer.pad(
                {key: [encoded[key][i] for i in batch_idx] for key in keys},
                padding="max_length",
                max_length=padded_length(lengths[batch_idx[0]], max_length),
                return_tensors="pt",
            )
            features = {k: to_device(v, self.device) for k, v in features.items()}
            with autocast(self.device, self.autocast):
                outputs = self.model(**features, output_hidden_states=True, return_dict=True)
            hidden = to_host([outputs.hidden_states[layer] for layer in layers], out_dtype)
            for row, example in enumerate(batch_idx):
                n = lengths[example]
                per_example[example] = {
                    layer: h[row, :n].numpy() for layer, h in zip(layers, hidden, strict=True)
                }
        packed = {layer: np.concatenate([ex[layer] for ex in per_example], axis=0) for layer in layers}
        # Emoji-only or zero-width text often becomes [CLS] [UNK] [SEP] or just [CLS] [SEP]: worth a warning.
        no_content = [i for i, example_ids in enumerate(ids) if all(t in special for t in example_ids)]
        return EncodedShard(lengths=lengths, layers=packed, truncated=truncated, no_content=no_content)


PAD_MULTIPLE = 8


def padded_length(length: int, max_length: int) -> int:
    """The length a text of ``length`` tokens is padded to: the next multiple of :data:`PAD_MULTIPLE`
    (at most ``max_length``), decided by the text alone, never by the longest text beside it."""
    return min(-(-length // PAD_MULTIPLE) * PAD_MULTIPLE, max(length, max_length))


def same_padding_batches(lengths: list[int], batch_size: int, max_length: int) -> list[list[int]]:
    """Indices of ``lengths`` in batches of at most ``batch_size`` that all pad to one length.

    Why: padding changes the last bits of a transformer's activations (masked positions still enter
    its softmax and matmul reductions), while the batch size does not. Padding every text to a length
    of its own makes its rows a function of the text alone, so the same input gets the same bytes in
    any segment, whatever it was batched with (an incremental extraction then equals one from scratch
    bit for bit). Sorted by length, so padding stays under 8 tokens a text; the order is deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    for index in order:
        pad = padded_length(lengths[index], max_length)
        last = batches[-1] if batches else None
        if last is None or len(last) == batch_size or padded_length(lengths[last[0]], max_length) != pad:
            batches.append([index])
        else:
            last.append(index)
    return batches


def _count_truncated(encoded: Any, max_length: int) -> int:
    """Texts the tokenizer cut at ``max_length``: exact with a fast tokenizer (it keeps the overflow);
    a slow one only tells that a text reached the limit, which is counted as cut."""
    encodings = getattr(encoded, "encodings", None)
    if encodings:
        return sum(1 for encoding in encodings if encoding.overflowing)
    return sum(1 for ids in encoded["input_ids"] if len(ids) >= max_length)
