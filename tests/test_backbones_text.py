"""Text encoders through load_backbone: a tiny random T5 (its encoder) and a tokenizer built offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from extract.backbones import HFTextBackbone, load_backbone
from extract.spec import BackboneLoadSpec
from pipeline.config import BackboneConfig
from pipeline.identity import backbone_identity
from tests.conftest import FILLER, NEGATIVE, POSITIVE

TEXTS = ["the film was great", "a very dull and tedious plot", "superb", "the actors is quite weak and awful"]


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random T5 and a word-level tokenizer (pad 0, eos 1, unk 2), saved to a folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5Model

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in FILLER + POSITIVE + NEGATIVE:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = tmp_path_factory.mktemp("tiny-t5")
    # It also returns token_type_ids, which a T5 encoder does not take: encode() must drop them.
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    ).save_pretrained(path)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(vocab),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
    )
    T5Model(config).eval().save_pretrained(path, safe_serialization=True)
    return path


def test_t5_encoder_hidden_states(tiny_t5_dir):
    from transformers import AutoTokenizer, T5EncoderModel

    backbone = load_backbone(BackboneLoadSpec(str(tiny_t5_dir), device="cpu"))
    assert isinstance(backbone, HFTextBackbone)
    info = backbone.describe()
    assert info["input"] == "text" and info["model_type"] == "t5"
    assert info["num_hidden_states"] == 3 and info["hidden_sizes"] == {0: 32, 1: 32, 2: 32}

    encoded = backbone.encode(TEXTS, [0, 1, 2], max_length=16, batch_size=3, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    assert "token_type_ids" in tokenizer(TEXTS[:1])
    lengths = [len(tokenizer(text)["input_ids"]) for text in TEXTS]
    assert encoded.lengths == lengths and lengths[2] == 2  # "superb" + </s>

    # The encoder alone, loaded independently, one text at a time (no padding).
    encoder = T5EncoderModel.from_pretrained(tiny_t5_dir, use_safetensors=True).eval()
    offsets = np.cumsum([0] + lengths)
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            states = encoder(input_ids=ids, output_hidden_states=True).hidden_states
        assert len(states) == 3
        for layer in range(3):
            got = encoded.layers[layer][offsets[i] : offsets[i + 1]]
            np.testing.assert_allclose(got, states[layer][0].numpy(), rtol=1e-5, atol=1e-5)
    # The last hidden state is the encoder's output (after its final layer norm), not a decoder's.
    with torch.no_grad():
        last = encoder(input_ids=torch.tensor([tokenizer(TEXTS[0])["input_ids"]])).last_hidden_state
    np.testing.assert_allclose(encoded.layers[2][: lengths[0]], last[0].numpy(), rtol=1e-5, atol=1e-5)

    fp16 = backbone.encode(TEXTS, [2], max_length=3, batch_size=2)  # truncation to max_length
    assert fp16.lengths == [min(n, 3) for n in lengths] and fp16.layers[2].dtype == np.float16


def test_t5_identity_hashes_its_tokenizer(tiny_t5_dir):
    ident = backbone_identity(BackboneConfig(name_or_path=str(tiny_t5_dir)))
    assert ident.tokenizer_sha256 != "none" and len(ident.weights_sha256) == 64
