"""The tuned model is the product: every run writes it (model.safetensors + model.json), `unipt export`
copies it out, and `unipt predict/evaluate` run it on raw inputs exactly as training saw its cache."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import Extraction, make_sentiment_rows, save_tiny_bert, write_config, write_csv
from unipt.pipeline import experiment
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cli.app import main
from unipt.pipeline.config import load_config
from unipt.pipeline.data.table import load_dataset
from unipt.pipeline.errors import UniptError
from unipt.pipeline.model.card import CARD_FILE, read_card
from unipt.pipeline.model.files import MODEL_CARD, MODEL_WEIGHTS, export_model, read_model_spec
from unipt.pipeline.model.predict import TunedModel, load_model

pytestmark = pytest.mark.e2e


def _trained(tmp_path, tiny_bert_dir, dtype: str):
    data = write_csv(tmp_path / "reviews.csv", make_sentiment_rows(160))
    config_path = write_config(
        tmp_path / "c.yaml", str(data), str(tiny_bert_dir), tmp_path, train={"epochs": 3},
        extract={"dtype": dtype},
    )  # fmt: skip
    return _run(config_path)


def _trained_on_shared(shared: Extraction, tmp_path):
    """A run of 3 epochs from the session's shared float16 cache (a cache hit), recorded under tmp_path."""
    return _run(shared.config_in(tmp_path, train={"epochs": 3}))


def _run(config_path):
    config = load_config(config_path)
    prep = experiment.prepare(config)
    return config_path, prep, experiment.run(prep, progress=False)


@pytest.mark.parametrize("dtype", ["float16", "int8", "float8_e4m3"])
def test_predicting_raw_text_gives_the_cache_logits_and_the_recorded_accuracy(
    dtype, tmp_path, tiny_bert_dir, ray_session
):
    _, prep, run = _trained(tmp_path, tiny_bert_dir, dtype)
    spec = read_model_spec(run.run_dir)
    assert (run.run_dir / MODEL_WEIGHTS).is_file()
    assert spec.dtype == dtype and spec.cache_key == prep.key and spec.run_id == run.run_id
    assert spec.layers == [0, 1, 2] and spec.hidden_sizes == {"0": 32, "1": 32, "2": 32}
    assert spec.label_names == ["neg", "pos"] and spec.max_length == 32 and spec.input == "text"
    assert spec.backbone["weights_sha256"] == prep.primary.identity.weights_sha256
    assert spec.metrics["test_acc"] == run.trained.metrics["test_acc"]

    model = load_model(run.run_dir, device="cpu")
    reader = open_cache(prep.cache_root.location(prep.key))
    indices, from_cache = model.outputs_from_cache(reader, "test")
    table = prep.dataset.table
    texts = [table.column("text")[int(i)].as_py() for i in indices]
    ids = [table.column("example_id")[int(i)].as_py() for i in indices]
    predictions = model.predict(texts, ids, batch_size=16)
    # The same activations (rounded to the cache's dtype), so the same logits up to float noise.
    np.testing.assert_allclose(predictions.outputs, from_cache, atol=2e-3, rtol=1e-3)
    labels = reader.labels()[indices]
    accuracy = float(np.mean(predictions.outputs.argmax(1) == labels))
    assert accuracy == pytest.approx(run.trained.metrics["test_acc"])
    assert predictions.example_ids == ids
    probs = predictions.probabilities
    assert probs is not None and np.allclose(probs.sum(1), 1.0)
    metrics = model.evaluate(texts, [spec.label_names[int(y)] for y in labels], batch_size=16)
    assert metrics["acc"] == pytest.approx(run.trained.metrics["test_acc"])


def test_export_predict_and_evaluate_from_the_command_line(
    tmp_path, tiny_bert_dir, shared_extraction, capsys
):
    config_path, prep, run = _trained_on_shared(shared_extraction, tmp_path)
    registry = str(tmp_path / "registry.sqlite")
    out = tmp_path / "exported"
    assert main(["export", run.run_id[:18], "--out", str(out), "--registry", registry]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([MODEL_CARD, MODEL_WEIGHTS, CARD_FILE])
    card = json.loads((out / MODEL_CARD).read_text())
    assert card["backbone"]["name_or_path"] == str(tiny_bert_dir) and card["cache_key"] == prep.key
    # Every file of the run and of the export is readable by others, like the rest of a run (umask 022).
    for folder in (run.run_dir, out):
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}
        assert set(modes.values()) == {0o666 & ~_umask()}, modes
    capsys.readouterr()

    dataset = load_dataset(load_config(config_path).dataset)
    test = dataset.table.filter(dataset.table.column("split").to_numpy(zero_copy_only=False) == "test")
    rows = [
        {"id": i, "text": t, "label": dataset.label_names[y]}
        for i, t, y in zip(
            test.column("example_id").to_pylist(),
            test.column("text").to_pylist(),
            test.column("label").to_pylist(),
            strict=True,
        )
    ]
    labelled = write_csv(tmp_path / "test.csv", rows)
    preds = tmp_path / "preds.csv"
    argv = ["--input", str(labelled), "--id-column", "id", "--no-progress", "--device", "cpu"]
    assert main(["predict", str(out), *argv, "--out", str(preds)]) == 0
    with open(preds) as handle:
        written = list(csv.DictReader(handle))
    assert [r["example_id"] for r in written] == [r["id"] for r in rows]
    assert set(written[0]) == {"example_id", "label", "prob_neg", "prob_pos"}
    accuracy = np.mean([w["label"] == r["label"] for w, r in zip(written, rows, strict=True)])
    assert accuracy == pytest.approx(run.trained.metrics["test_acc"])

    capsys.readouterr()
    assert main(["evaluate", run.run_id, *argv, "--registry", registry]) == 0
    line = capsys.readouterr().out
    assert f"acc {run.trained.metrics['test_acc']:.4f}" in line and f"{len(rows)} examples" in line

    assert main(["predict", str(out), "--text", "a wonderful film", "--text", "dull", "--no-progress"]) == 0
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [p["example_id"] for p in printed] == ["0", "1"] and all(
        p["label"] in ("neg", "pos") for p in printed
    )

    # Bad input is refused in one line, like every other command.
    for bad in (
        ["--input", str(tmp_path / "missing.csv")],
        ["--input", str(labelled), "--text-column", "review"],
        ["--input", str(config_path)],
        [],
    ):
        code = main(["predict", str(out), *bad, "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("unipt: error:") and err.count("\n") == 1, (bad, err)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_pretrained_and_from_pretrained_round_trip_with_a_model_card(
    tmp_path, tiny_bert_dir, shared_extraction
):
    _, prep, run = _trained_on_shared(shared_extraction, tmp_path)
    model = TunedModel.from_pretrained(run.run_dir, device="cpu")
    saved = model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in saved.iterdir()) == sorted([MODEL_CARD, MODEL_WEIGHTS, CARD_FILE])
    # The weights are the run's, bit for bit, and the folder `unipt export` writes is the same folder.
    assert load_file(str(saved / MODEL_WEIGHTS)).keys() == load_file(str(run.run_dir / MODEL_WEIGHTS)).keys()
    for name, tensor in load_file(str(saved / MODEL_WEIGHTS)).items():
        assert torch.equal(tensor, load_file(str(run.run_dir / MODEL_WEIGHTS))[name])
    exported = export_model(run.run_dir, tmp_path / "exported")
    # Tensors and metadata alike (safetensors writes its metadata map in no fixed order, so not the bytes).
    from safetensors import safe_open

    with safe_open(exported / MODEL_WEIGHTS, "pt") as mine, safe_open(saved / MODEL_WEIGHTS, "pt") as theirs:
        assert mine.metadata() == theirs.metadata() == {"format": "pt", "unipt": "1"}
        assert list(mine.keys()) == list(theirs.keys())
        assert all(torch.equal(mine.get_tensor(k), theirs.get_tensor(k)) for k in mine.keys())

    texts = ["a wonderful film", "dull and slow", "great acting"]
    again = TunedModel.from_pretrained(saved, device="cpu")
    np.testing.assert_array_equal(again.predict(texts).outputs, model.predict(texts).outputs)
    assert again.spec == model.spec
    for size in (0, -1):  # the Python API and MLflow's model_config reach here without the CLI's check
        with pytest.raises(UniptError, match=f"batch_size {size}: give 1 or more"):
            again.predict(texts, batch_size=size)

    # The card: Hugging Face-style front matter, then the numbers a person looks for first.
    header, body = read_card(saved)
    assert header["library_name"] == "unipt-cache" and "unipt" in header["tags"]
    assert header["metrics"] == ["accuracy", "f1"] and header["pipeline_tag"] == "text-classification"
    assert "base_model" not in header  # a local folder is no hub id
    assert "`neg`, `pos`" in body and prep.primary.identity.weights_sha256 in body
    assert prep.key in body and prep.dataset.fingerprint in body and run.run_id in body
    test_acc, majority = run.trained.metrics["test_acc"], run.trained.metrics["majority_test_acc"]
    assert f"| this model | acc | {run.trained.metrics['val_acc']:.4f} | {test_acc:.4f} |" in body
    assert "| majority class | acc | " in body and f"{majority:.4f} |" in body
    assert f"unipt predict {saved} --input" in body and f'TunedModel.from_pretrained("{saved}")' in body
    assert f'from_pretrained("{run.run_dir}")' in (run.run_dir / CARD_FILE).read_text()
    for warning in run.trained.warnings or []:
        assert warning in body

    # A folder holding anything else is refused, and nothing in it changes; the model's own are replaced.
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UniptError, match="is not empty"):
        model.save_pretrained(other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    assert model.save_pretrained(saved) == saved and read_card(saved)[0] == header
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saved.")]  # no staging left behind


def test_predict_refuses_a_backbone_whose_weights_differ(tmp_path, tiny_bert_dir, shared_extraction, capsys):
    _, prep, run = _trained_on_shared(shared_extraction, tmp_path)
    other = save_tiny_bert(tmp_path / "other-bert", seed=1)
    code = main(["predict", str(run.run_dir), "--text", "fine", "--backbone", str(other), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "weights_sha256" in err and "not the one this model was trained on" in err
    # The same files elsewhere hash the same and are accepted.
    moved = shutil.copytree(tiny_bert_dir, tmp_path / "moved-bert")
    code = main(["predict", str(run.run_dir), "--text", "fine", "--backbone", str(moved), "--no-progress"])
    assert code == 0, capsys.readouterr().err


def test_predict_and_evaluate_read_the_columns_the_model_was_trained_on(
    tmp_path, tiny_bert_dir, ray_session, capsys
):
    """A model trained on a file whose columns are `review` and `stars` reads the same names from an
    input file without --text-column/--label-column; a flag still overrides, and a model.json written
    before the columns were recorded falls back to `text` and `label`."""
    rows = [{"id": r["id"], "review": r["text"], "stars": r["label"]} for r in make_sentiment_rows(120)]
    data = write_csv(tmp_path / "reviews.csv", rows)
    config_path = write_config(
        tmp_path / "c.yaml", str(data), str(tiny_bert_dir), tmp_path, train={"epochs": 2},
        dataset={"text_column": "review", "label_column": "stars", "id_column": "id"},
    )  # fmt: skip
    run = experiment.run(experiment.prepare(load_config(config_path)), progress=False)
    spec = read_model_spec(run.run_dir)
    assert spec.columns == {"text": "review", "label": "stars", "id": "id"}

    held_out = write_csv(tmp_path / "new.csv", rows[:20])
    argv = ["--input", str(held_out), "--no-progress", "--device", "cpu"]
    capsys.readouterr()
    assert main(["predict", str(run.run_dir), *argv]) == 0
    predicted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(predicted) == 20 and all(p["label"] in ("neg", "pos") for p in predicted)
    # The id column the model was trained with is echoed, so predictions join back to the input.
    assert [p["example_id"] for p in predicted] == [str(r["id"]) for r in rows[:20]]
    no_ids = write_csv(tmp_path / "no_ids.csv", [{"review": r["review"]} for r in rows[:5]])
    assert (
        main(["predict", str(run.run_dir), "--input", str(no_ids), "--no-progress", "--device", "cpu"]) == 0
    )
    out, err = capsys.readouterr()
    assert [json.loads(line)["example_id"] for line in out.splitlines()] == ["0", "1", "2", "3", "4"]
    assert "no column 'id' (the model's id column): ids are the row numbers" in err
    assert main(["evaluate", str(run.run_dir), *argv]) == 0
    assert "20 examples" in capsys.readouterr().out

    # A flag overrides what the model recorded: this file has no `text` column, so it is refused.
    assert main(["predict", str(run.run_dir), *argv, "--text-column", "text"]) == 2
    assert "has no column 'text'" in capsys.readouterr().err

    # An older model.json (no columns): the usual names, so this file's `review` is not found.
    card = json.loads((run.run_dir / MODEL_CARD).read_text())
    del card["columns"]
    (run.run_dir / MODEL_CARD).write_text(json.dumps(card))
    assert main(["predict", str(run.run_dir), *argv]) == 2
    assert "has no column 'text'" in capsys.readouterr().err
