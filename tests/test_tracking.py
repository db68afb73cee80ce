"""Tracking sinks: a run sent to a local file-store MLflow URI and to a TensorBoard folder, both read back
with the tools' own readers; the registry records where the run went."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")  # the [tracking] extra; setup.sh installs it, so CI runs these
pytest.importorskip("tensorboard")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from pipeline import experiment  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.errors import UniptError  # noqa: E402
from pipeline.registry import Registry  # noqa: E402
from tests.conftest import make_sentiment_rows, write_config, write_csv  # noqa: E402

pytestmark = pytest.mark.e2e

EPOCHS = 3


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_bert_dir, ray_session) -> Path:
    """A config whose cache is extracted (once for the module)."""
    root = tmp_path_factory.mktemp("tracking")
    data = write_csv(root / "reviews.csv", make_sentiment_rows(120))
    config = write_config(root / "c.yaml", str(data), str(tiny_bert_dir), root, train={"epochs": EPOCHS})
    prep = experiment.prepare(load_config(config))
    for result in experiment.extract_all(prep, progress=False).values():
        result.release()
    return config


def test_a_run_goes_to_mlflow_and_tensorboard_and_the_registry_knows_where(extracted, tmp_path):
    mlruns, tb = tmp_path / "mlruns", tmp_path / "tb"
    registry = tmp_path / "registry.sqlite"
    code = main(
        ["train", str(extracted), "--registry", str(registry), "--runs-root", str(tmp_path / "runs"),
         "--set", f"tracking.mlflow={mlruns}", "--set", f"tracking.tensorboard={tb}", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    record = json.loads((run_dir / "record.json").read_text())
    tracking = record["tracking"]
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
