"""Config validation: typos and wrong types are errors, overrides apply."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, Field

from unipt.pipeline.config import (
    ExperimentConfig,
    TrainConfig,
    affects,
    load_config,
    names_affecting,
    undeclared,
    upgrade,
    upgrade_key_fields,
    validate_stored,
)
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


# --- what each setting changes, declared on its field -----------------------------------------------------


def test_every_setting_declares_what_it_changes():
    assert undeclared(ExperimentConfig) == []

    class Section(BaseModel):  # the check finds a setting that declares nothing, in a nested section too
        declared: int = Field(1, json_schema_extra=affects("training"))
        forgotten: int = 2

    class Whole(BaseModel):
        top: str = Field("x", json_schema_extra=affects(None))
        inner: Section = Section()

    assert undeclared(Whole) == ["inner.forgotten"]
    with pytest.raises(ValueError, match="not one of"):
        affects("results")


def test_a_checkpoint_must_agree_on_the_training_settings_and_only_those():
    from unipt.train.fit import Task, fit_identity

    task = Task(model=None, train_data=[], loss=None, validate=dict, score="acc")
    base = fit_identity(TrainConfig(), 0, task)
    assert set(base["train"]) == set(names_affecting(TrainConfig, "training"))
    assert {"lr", "epochs", "view_order", "amp"} <= set(base["train"])
    # Settings declared to change nothing may differ on resume; a training setting may not.
    for name, value in {"device": "cpu", "reader_threads": 1, "probe_baseline": False}.items():
        assert fit_identity(TrainConfig(**{name: value}), 0, task) == base, name
    assert fit_identity(TrainConfig(lr=0.5), 0, task) != base


# --- configs and records written by older versions: config.upgrade ----------------------------------------


def _config_with(tmp_path, train: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(f"dataset: {{source: a.csv}}\nbackbone: {{name_or_path: m}}\ntrain: {train}\n")
    return path


def test_the_old_probe_key_still_loads_under_its_new_name(tmp_path, caplog):
    path = _config_with(tmp_path, "{linear_probe: false}")
    with pytest.warns(
        DeprecationWarning, match="train.linear_probe is deprecated; write train.probe_baseline"
    ):
        config = load_config(path)
    assert config.train.probe_baseline is False and TrainConfig().probe_baseline is True
    assert "write train.probe_baseline" in caplog.text
    # An old run record's config, as rerun and sweeps read it: the same setting, and no warning to the user.
    stored = {"name": "old", **yaml.safe_load(path.read_text())}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_stored(stored, "run old").train.probe_baseline is False
    assert stored["train"] == {"linear_probe": False}  # upgrade works on a copy


def test_a_sweep_over_the_old_probe_key_sweeps_the_setting_under_its_new_name():
    from unipt.pipeline.cli.sweep import parse_grid, parse_samples

    with pytest.warns(DeprecationWarning, match="write train.probe_baseline"):
        assert parse_grid(["train.linear_probe=true,false"]) == {"train.probe_baseline": ["true", "false"]}
    with pytest.warns(DeprecationWarning):
        assert set(parse_samples(["train.linear_probe=uniform:0:1"])) == {"train.probe_baseline"}


def test_old_and_new_name_together_is_one_line(tmp_path):
    path = _config_with(tmp_path, "{linear_probe: false, probe_baseline: true}")
    with pytest.raises(UniptError, match="one setting .* keep only train.probe_baseline"):
        load_config(path)


def test_stored_configs_get_what_older_versions_computed_and_files_get_the_defaults(tmp_path):
    old = upgrade({"train": {"amp": "bf16"}}, stored=True)
    assert old["dataset"]["split"]["scheme"] == 1
    assert old["train"] == {
        "amp": "bfloat16", "length_grouping": False, "loader_memory_mb": None, "view_order": 1,
    }  # fmt: skip
    assert upgrade(old, stored=True) == old  # the rules apply once
    recorded = {"train": {"length_grouping": True, "view_order": 2}}  # set: kept
    assert upgrade(recorded, stored=True)["train"]["view_order"] == 2
    config = load_config(_config_with(tmp_path, "{epochs: 2}"))  # a file that lacks them: today's defaults
    assert (config.dataset.split.scheme, config.train.view_order, config.train.length_grouping) == (
        2,
        2,
        True,
    )
    assert config.train.loader_memory_mb == 512


def test_the_validator_still_takes_the_old_amp_spellings_from_python():
    with pytest.warns(DeprecationWarning, match="train.amp 'fp16' is deprecated"):
        assert TrainConfig(amp="fp16").amp == "float16"


def test_a_stored_config_that_no_longer_validates_is_one_line():
    with pytest.raises(UniptError, match=r"config stored for run x no longer validates \(train.epochs"):
        validate_stored(
            {
                "name": "x",
                "dataset": {"source": "a"},
                "backbone": {"name_or_path": "m"},
                "train": {"epochs": 0},
            },
            "run x",
        )


def test_a_cache_made_before_a_setting_existed_says_what_it_computed():
    old = {"backbone": {"weights_sha256": "w"}, "layers": [0, 3], "dtype": "int8"}  # no autocast, max_length
    fields = upgrade_key_fields(old, dtype="float16", max_length=64)
    assert fields == {**old, "autocast": "none", "max_length": 64}  # what it recorded wins over the store
    assert upgrade_key_fields({}, dtype="float16", max_length=64)["layers"] == "all"
    assert "autocast" not in old  # a copy: the cache key is the hash of the fields as written


def test_a_checkpoint_from_before_a_setting_existed_resumes_only_with_what_it_computed(tmp_path):
    from unipt.train.fit import Task, _check_same_run, fit_identity

    task = Task(model=None, train_data=[], loss=None, validate=dict, score="acc")
    saved = fit_identity(TrainConfig(), 0, task)
    for name in ("length_grouping", "loader_memory_mb", "view_order"):  # an older unipt's checkpoint
        del saved["train"][name]
    with pytest.raises(UniptError, match=r"train.length_grouping was False, now True"):
        _check_same_run(saved, fit_identity(TrainConfig(), 0, task), tmp_path / "ckpt")
    then = TrainConfig(length_grouping=False, loader_memory_mb=None, view_order=1)
    _check_same_run(saved, fit_identity(then, 0, task), tmp_path / "ckpt")  # what it computed: resumes
