"""Config validation: typos and wrong types are errors, overrides apply."""

from __future__ import annotations

import pytest

from unipt.pipeline.config import load_config
from unipt.pipeline.errors import UniptError


def test_default_config_loads_and_overrides_apply():
    config = load_config("configs/rt_minilm.yaml", ["train.epochs=2", "backbone.layers=[0, 6]"])
    assert config.train.epochs == 2
    assert config.backbone.layers == [0, 6]
    assert config.dataset.source == "bundled:rotten_tomatoes"


def test_unknown_key_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ndataset: {source: a.csv}\nbackbone: {name_or_path: m}\ntrain: {epoch: 3}\n")
    with pytest.raises(UniptError, match=r"train\.epoch: unknown key"):
        load_config(path)


def test_wrong_type_is_rejected():
    with pytest.raises(UniptError, match=r"train\.epochs"):
        load_config("configs/rt_minilm.yaml", ["train.epochs=many"])


def test_bad_split_fractions_are_rejected():
    with pytest.raises(UniptError, match="sum to 1"):
        load_config("configs/rt_minilm.yaml", ["dataset.split.train=0.9"])


def test_missing_config_file(tmp_path):
    with pytest.raises(UniptError, match="not found"):
        load_config(tmp_path / "none.yaml")


@pytest.mark.parametrize("word", ["auto", "off", "float16", "bfloat16"])
def test_amp_takes_the_dtype_words(word, recwarn):
    assert load_config("configs/rt_minilm.yaml", [f"train.amp={word}"]).train.amp == word
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize(("alias", "word"), [("bf16", "bfloat16"), ("fp16", "float16")])
def test_amp_old_spellings_still_load_with_a_deprecation_warning(alias, word, caplog):
    with pytest.warns(DeprecationWarning, match=f"train.amp '{alias}' is deprecated; write '{word}'"):
        config = load_config("configs/rt_minilm.yaml", [f"train.amp={alias}"])
    assert config.train.amp == word
    assert f"write '{word}'" in caplog.text  # also said through the unipt logger, which users see


def test_amp_rejects_other_words():
    with pytest.raises(UniptError, match=r"train\.amp"):
        load_config("configs/rt_minilm.yaml", ["train.amp=half"])
