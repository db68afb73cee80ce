"""Text encoders through load_backbone: a tiny random T5 (its encoder) and a tokenizer built offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import FILLER, NEGATIVE, POSITIVE
from unipt.extract.backbones import HFTextBackbone, load_backbone
from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline.cache.identity import backbone_identity
from unipt.pipeline.config import BackboneConfig

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


@pytest.fixture(scope="module")
def tiny_roberta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random RoBERTa with a byte-level BPE tokenizer trained offline on the test words."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    path = tmp_path_factory.mktemp("tiny-roberta")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [" ".join(FILLER + POSITIVE + NEGATIVE)] * 4,
        vocab_size=300,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    bpe.save_model(str(path))
    RobertaTokenizerFast(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(path)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=1,
    )
    RobertaModel(config).eval().save_pretrained(path, safe_serialization=True)
    return path


def test_roberta_hidden_states_match_the_model_one_text_at_a_time(tiny_roberta_dir):
    from transformers import AutoTokenizer, RobertaModel

    backbone = load_backbone(BackboneLoadSpec(str(tiny_roberta_dir), device="cpu"))
    assert isinstance(backbone, HFTextBackbone) and backbone.describe()["model_type"] == "roberta"
    encoded = backbone.encode(TEXTS, [0, 2], max_length=16, batch_size=3, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(tiny_roberta_dir)
    model = RobertaModel.from_pretrained(tiny_roberta_dir, use_safetensors=True).eval()
    offsets = np.cumsum([0] + encoded.lengths)
    for i, text in enumerate(TEXTS):
        ids = tokenizer(text, truncation=True, max_length=16, return_tensors="pt")
        assert ids["input_ids"].shape[1] == encoded.lengths[i]
        with torch.no_grad():
            states = model(**ids, output_hidden_states=True).hidden_states
        for layer in (0, 2):
            got = encoded.layers[layer][offsets[i] : offsets[i + 1]]
            np.testing.assert_allclose(got, states[layer][0].numpy(), rtol=1e-4, atol=1e-5)


def test_a_texts_activations_do_not_depend_on_what_it_is_batched_with(tiny_roberta_dir):
    """Same bytes for the same text in any batch: what lets segments built at different times (an
    incremental extraction) hold exactly what one extraction from scratch would."""
    from transformers import AutoTokenizer, RobertaModel

    from unipt.extract.backbones.hf_text import padded_length, same_padding_batches

    backbone = load_backbone(BackboneLoadSpec(str(tiny_roberta_dir), device="cpu"))
    many = [f"{text} {' '.join(FILLER[: k % 9])}".strip() for k, text in enumerate(TEXTS * 6)]
    batched = backbone.encode(many, [0, 1, 2], max_length=24, batch_size=5, dtype="float32")
    offsets = np.cumsum([0] + batched.lengths)
    for i in (0, 7, 13, 22):
        alone = backbone.encode([many[i]], [0, 1, 2], max_length=24, batch_size=5, dtype="float32")
        for layer in (0, 1, 2):
            np.testing.assert_array_equal(
                batched.layers[layer][offsets[i] : offsets[i + 1]], alone.layers[layer]
            )

    # What it guards against: padded to the longest text beside it, a text's rows change in their last bits.
    tokenizer = AutoTokenizer.from_pretrained(tiny_roberta_dir)
    model = RobertaModel.from_pretrained(tiny_roberta_dir, use_safetensors=True).eval()
    short, longest = many[2], max(many, key=len)
    with torch.no_grad():
        n = len(tokenizer(short)["input_ids"])
        own = model(**tokenizer([short], return_tensors="pt"), output_hidden_states=True).hidden_states
        beside = model(
            **tokenizer([short, longest], padding=True, return_tensors="pt"), output_hidden_states=True
        )
    assert not all(torch.equal(a[0, :n], b[0, :n]) for a, b in zip(own, beside.hidden_states, strict=True))

    # Batches: sorted by length, each one padding length (next multiple of 8, capped), at most batch_size.
    lengths = [3, 17, 9, 8, 16, 1, 30, 8, 5]
    batches = same_padding_batches(lengths, batch_size=2, max_length=30)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 2 and len({padded_length(lengths[i], 30) for i in batch}) == 1
    assert [padded_length(n, 30) for n in (1, 8, 9, 29, 30)] == [8, 8, 16, 30, 30]
