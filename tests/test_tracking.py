"""Tracking sinks: a run sent to a local file-store MLflow URI and to a TensorBoard folder, both read back
with the tools' own readers; the registry records where the run went."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("mlflow.pyfunc")  # the [tracking] extra; setup.sh installs it, so CI runs these
pytest.importorskip("tensorboard")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData  # noqa: E402

from tests.conftest import Extraction, run_cli  # noqa: E402
from unipt.pipeline.cli.app import main  # noqa: E402
from unipt.pipeline.config import load_config  # noqa: E402
from unipt.pipeline.errors import UniptError  # noqa: E402
from unipt.pipeline.model.predict import TunedModel  # noqa: E402
from unipt.pipeline.runs.registry import Registry  # noqa: E402

pytestmark = pytest.mark.e2e

EPOCHS = 3
EVERY = 2  # tracking.log_every_steps in the tests


def _steps_per_epoch(record: dict) -> int:
    """Optimiser steps per epoch: the train split's batches."""
    train_examples = record["dataset"]["splits"]["train"]
    return -(-train_examples // record["config"]["train"]["batch_size"])


def _step(metric) -> int:
    return metric.step


@pytest.fixture
def extracted(shared_extraction: Extraction, tmp_path: Path) -> Path:
    """A config that reads the session's shared cache, trains EPOCHS epochs and keeps its runs and registry
    under the test's tmp_path."""
    return shared_extraction.config_in(tmp_path, train={"epochs": EPOCHS})


def test_a_run_goes_to_mlflow_and_tensorboard_and_the_registry_knows_where(extracted, tmp_path):
    mlruns, tb = tmp_path / "mlruns", tmp_path / "tb"
    registry = tmp_path / "registry.sqlite"
    code = main(
        ["train", str(extracted), "--registry", str(registry), "--runs-root", str(tmp_path / "runs"),
         "--set", f"tracking.mlflow={mlruns}", "--set", f"tracking.tensorboard={tb}",
         "--set", f"tracking.log_every_steps={EVERY}", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    record = json.loads((run_dir / "record.json").read_text())
    tracking = record["tracking"]
    steps = EPOCHS * _steps_per_epoch(record)
    logged_steps = list(range(EVERY, steps + 1, EVERY))
    assert len(logged_steps) == steps // EVERY > EPOCHS  # more points than epochs: a curve
    assert tracking["mlflow_uri"] == mlruns.resolve().as_uri()

    # MLflow, read back from its file store.
    client = MlflowClient(tracking_uri=tracking["mlflow_uri"])
    run = client.get_run(tracking["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == record["run_id"]
    assert client.get_experiment(run.info.experiment_id).name == record["config"]["name"]
    assert run.data.tags["dataset_fingerprint"] == record["dataset"]["fingerprint"]
    assert run.data.tags["cache_key"] == record["cache"]["key"]
    assert run.data.tags["unipt.run_id"] == record["run_id"]
    assert run.data.params["train.epochs"] == str(EPOCHS)
    assert run.data.params["train.lr"] == str(record["config"]["train"]["lr"])
    assert run.data.params["dataset.source"] == record["config"]["dataset"]["source"]
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [1, 2, 3]
    assert [m.value for m in losses] == pytest.approx([h["train_loss"] for h in record["history"]])
    val_acc = client.get_metric_history(run.info.run_id, "val_acc")
    assert [m.value for m in val_acc] == pytest.approx([h["val_acc"] for h in record["history"]])
    assert run.data.metrics["final.test_acc"] == pytest.approx(record["metrics"]["test_acc"])
    step_losses = client.get_metric_history(run.info.run_id, "train_step_loss")
    assert sorted(m.step for m in step_losses) == logged_steps
    assert all(math.isfinite(m.value) and m.value > 0 for m in step_losses)
    step_lrs = client.get_metric_history(run.info.run_id, "train_step_lr")
    assert sorted(m.step for m in step_lrs) == logged_steps
    assert max(m.value for m in step_lrs) <= record["config"]["train"]["lr"] + 1e-12
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    names = {"model.safetensors", "model.json", "README.md", "curves.png", "layer_weights.png", "record.json"}
    assert names <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "model.safetensors", str(tmp_path / "dl")))
    assert local.read_bytes() == (run_dir / "model.safetensors").read_bytes()

    # TensorBoard, read back from the event file.
    log_dir = Path(tracking["tensorboard_dir"])
    assert log_dir == (tb / record["run_id"]).resolve()
    assert list(log_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "val/acc", "val/f1", "final/test_acc"} <= set(scalars)
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([h["train_loss"] for h in record["history"]], rel=1e-6)
    (final,) = events.Scalars("final/test_acc")
    assert final.value == pytest.approx(record["metrics"]["test_acc"], rel=1e-6)
    assert "config" in {tag.split("/")[0] for tag in events.Tags()["tensors"]}
    step_loss = events.Scalars("train/step_loss")
    assert [e.step for e in step_loss] == logged_steps
    assert [e.value for e in step_loss] == pytest.approx([m.value for m in sorted(step_losses, key=_step)])
    # The HPARAMS view: the run's settings as hyperparameters, its final metrics as the view's metrics.
    hparams = {
        tag: HParamsPluginData.FromString(content)
        for tag, content in events.PluginTagToContent("hparams").items()
    }
    experiment_info = hparams["_hparams_/experiment"].experiment
    assert "final/test_acc" in {m.name.tag for m in experiment_info.metric_infos}
    assert {"train.lr", "train.epochs", "seed"} <= {h.name for h in experiment_info.hparam_infos}
    start = hparams["_hparams_/session_start_info"].session_start_info.hparams
    assert start["train.lr"].number_value == pytest.approx(record["config"]["train"]["lr"])
    assert start["train.epochs"].number_value == EPOCHS
    assert start["dataset.source"].string_value == record["config"]["dataset"]["source"]

    # The registry stays the source of truth and says where the run also went.
    with Registry(registry) as reg:
        entry = reg.get(record["run_id"])
    assert entry.artifacts["tracking"]["mlflow_run_id"] == run.info.run_id
    assert entry.artifacts["tracking"]["tensorboard_dir"] == str(log_dir)


def test_tracking_is_off_by_default_and_a_second_run_joins_the_same_experiment(extracted, tmp_path):
    runs = tmp_path / "runs"
    assert main(["train", str(extracted), "--runs-root", str(runs), "--no-progress"]) == 0
    (run_dir,) = runs.iterdir()
    assert "tracking" not in json.loads((run_dir / "record.json").read_text())

    mlruns = tmp_path / "mlruns"
    for _ in range(2):
        argv = ["train", str(extracted), "--runs-root", str(runs), "--set", f"tracking.mlflow={mlruns}"]
        assert main([*argv, "--set", "train.epochs=1", "--no-progress"]) == 0
    client = MlflowClient(tracking_uri=mlruns.resolve().as_uri())
    (experiment_,) = [e for e in client.search_experiments() if e.name == "test"]
    assert len(client.search_runs([experiment_.experiment_id])) == 2


def test_a_password_in_the_mlflow_uri_is_refused(extracted):
    with pytest.raises(UniptError, match="tracking.mlflow carries a user:password@"):
        load_config(extracted, ["tracking.mlflow=https://me:secret@mlflow.example.com"])


def test_the_model_logged_to_mlflow_loads_as_pyfunc_and_predicts_as_unipt_predict(
    extracted, tmp_path, tiny_bert_dir
):
    mlruns, runs = tmp_path / "mlruns", tmp_path / "runs"
    argv = ["train", str(extracted), "--runs-root", str(runs), "--set", "train.epochs=1", "--no-progress"]
    sinks = ["--set", f"tracking.mlflow={mlruns}", "--set", "tracking.mlflow_log_model=true"]
    assert main([*argv, *sinks]) == 0
    (run_dir,) = runs.iterdir()
    tracking = json.loads((run_dir / "record.json").read_text())["tracking"]
    client = MlflowClient(tracking_uri=tracking["mlflow_uri"])
    run_id = tracking["mlflow_run_id"]
    logged = {f.path for f in client.list_artifacts(run_id, "model")}
    assert {"model/MLmodel", "model/data"} <= logged
    local = Path(client.download_artifacts(run_id, "model", str(tmp_path / "dl")))
    mlmodel = (local / "MLmodel").read_text()
    # A loader-module model: MLflow imports our module; nothing in the model folder is code or a pickle.
    assert "loader_module: unipt.pipeline.model.mlflow_serve" in mlmodel
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".py", ".pickle", ".cloudpickle")]

    texts = ["a wonderful, moving film", "dull and far too long", "an average afternoon"]
    expected = [json.loads(line) for line in run_cli(
        "predict", str(run_dir), *[a for t in texts for a in ("--text", t)], "--no-progress"
    ).stdout.splitlines()]  # fmt: skip
    model = mlflow.pyfunc.load_model(str(local))
    got = model.predict(pd.DataFrame({"text": texts}))
    assert got["label"].tolist() == [row["label"] for row in expected]
    assert got["example_id"].tolist() == [row["example_id"] for row in expected]
    probabilities = [c for c in got.columns if c.startswith("prob_")]
    assert probabilities == [name for name in expected[0] if name.startswith("prob_")]
    for name in probabilities:
        assert got[name].tolist() == pytest.approx([row[name] for row in expected], abs=1e-6)

    # Loading options come from the person: the backbone's folder, yes; running the backbone's code, never.
    again = mlflow.pyfunc.load_model(
        str(local), model_config={"backbone": str(tiny_bert_dir), "device": "cpu"}
    )
    assert again.predict(pd.DataFrame({"text": texts}))["label"].tolist() == got["label"].tolist()
    conf = yaml.safe_load((local / "MLmodel").read_text())
    assert set(conf["flavors"]["python_function"]["config"]) == {"backbone", "device", "batch_size"}
    conf["flavors"]["python_function"]["config"]["trust_remote_code"] = True  # a hand-edited MLmodel
    (local / "MLmodel").write_text(yaml.safe_dump(conf))
    with pytest.raises(UniptError, match="model_config 'trust_remote_code' is not a setting"):
        mlflow.pyfunc.load_model(str(local), model_config={"trust_remote_code": True})

    # Registered in MLflow's model registry and loaded from there, as a serving step would.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking["mlflow_uri"])
    try:
        version = mlflow.register_model(f"runs:/{run_id}/model", "unipt-sentiment")
        served = mlflow.pyfunc.load_model(f"models:/unipt-sentiment/{version.version}")
        served_labels = served.predict(pd.DataFrame({"text": texts}))["label"].tolist()
        assert served_labels == [row["label"] for row in expected]
    finally:
        mlflow.set_tracking_uri(previous)


def test_logging_the_model_without_an_mlflow_sink_is_refused(extracted):
    with pytest.raises(UniptError, match="tracking.mlflow_log_model .* set tracking.mlflow too"):
        load_config(extracted, ["tracking.mlflow_log_model=true"])


def test_export_mlflow_writes_a_pyfunc_folder_that_predicts_as_the_run(extracted, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert (
        main(["train", str(extracted), "--runs-root", str(runs), "--set", "train.epochs=1", "--no-progress"])
        == 0
    )
    (run_dir,) = runs.iterdir()
    out = tmp_path / "served"
    assert main(["export", str(run_dir), "--out", str(out), "--mlflow"]) == 0
    assert (out / "MLmodel").is_file() and (out / "data" / "unipt-model" / "model.safetensors").is_file()
    texts = ["a wonderful, moving film", "dull and far too long", "an average afternoon"]
    expected = TunedModel.from_pretrained(run_dir, device="cpu").predict(texts)
    got = mlflow.pyfunc.load_model(str(out), model_config={"device": "cpu"}).predict(
        pd.DataFrame({"text": texts})
    )
    assert got["label"].tolist() == expected.labels
    # Never over another folder's files: one line, nothing changed.
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    capsys.readouterr()
    assert main(["export", str(run_dir), "--out", str(out), "--mlflow"]) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == f"unipt: error: --out {out} is not empty; give a new folder"
    )
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_step_interval_below_one_is_refused(extracted):
    with pytest.raises(UniptError, match="tracking.log_every_steps"):
        load_config(extracted, ["tracking.log_every_steps=0"])


def test_a_tracker_asked_to_log_the_model_without_a_way_to_refuses_before_any_training(tmp_path):
    from unipt.pipeline.config import TrackingConfig
    from unipt.pipeline.model.mlflow_export import log_pyfunc_model
    from unipt.pipeline.runs.tracking import Tracker

    config = TrackingConfig(mlflow=str(tmp_path / "mlruns"), mlflow_log_model=True)
    with pytest.raises(UniptError, match="no way to log the model"):
        Tracker(config, "run-1")
    assert Tracker(config, "run-1", log_model=log_pyfunc_model).enabled
