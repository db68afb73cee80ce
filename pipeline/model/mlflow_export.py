"""A tuned model as an MLflow pyfunc model, so ``mlflow.pyfunc.load_model``, ``mlflow models serve`` and
MLflow's model registry can use it (``tracking.mlflow_log_model: true`` logs one with each run).

The MLflow model is a *loader-module* pyfunc: its ``MLmodel`` file names
:mod:`unipt.pipeline.model.mlflow_serve`, and
its data is the exported model folder (``model.safetensors``, ``model.json``, ``README.md``). MLflow loads
it by importing that module from the installed unipt-cache and calling its ``_load_pyfunc`` on the folder,
which is :meth:`unipt.pipeline.model.predict.TunedModel.from_pretrained`: the folder holds data only. The
other two pyfunc styles were ruled out because each puts code into the model's files:
``python_model=<object>`` cloudpickles
the object (``python_model.pkl``, unpickled on load), and models-from-code copies a ``.py`` file into the
model that MLflow executes on load. Either way a file anyone may have replaced would decide what runs.

Serving needs unipt-cache installed (the logged requirements name it) and the backbone model.json names:
a hub name downloads at its recorded revision; a local path must exist where the model is served, or
``model_config={"backbone": DIR}`` points at a copy (its hashes are checked as ``unipt predict --backbone``
checks them). Input: a DataFrame (served: ``{"dataframe_records": [{"text": ...}, ...]}``) with the
text column the model was trained on (and the text-pair column for pair models; the trained id column,
when given, names the rows), as the model's signature states. Output: the rows ``unipt predict`` writes
(``example_id``, ``label`` and ``prob_*``, or ``value``).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from unipt.pipeline.errors import UniptError
from unipt.pipeline.extras import require
from unipt.pipeline.model.files import ModelSpec, export_model, read_model_spec

# What model_config may set when the model is loaded, and its defaults. trust_remote_code is not among them:
# the MLmodel file carries the model_config, and a file must not decide to run a backbone's code.
LOAD_SETTINGS = {"backbone": None, "device": "auto", "batch_size": 256}
LOADER_MODULE = (
    "unipt.pipeline.model.mlflow_serve"  # what MLflow imports to load the model (this module writes it)
)
ARTIFACT_PATH = "model"  # where in the MLflow run the pyfunc model goes: runs:/<id>/model


def log_pyfunc_model(client: Any, mlflow_run_id: str, run_dir: Path) -> None:
    """The run's model, exported and wrapped as a pyfunc model, logged to ``mlflow_run_id`` under
    ``model/`` (``client``: an ``MlflowClient``)."""
    with tempfile.TemporaryDirectory(prefix="unipt-mlflow-") as tmp:
        folder = export_model(run_dir, Path(tmp) / "unipt-model")
        save_pyfunc_model(folder, Path(tmp) / ARTIFACT_PATH)
        client.log_artifacts(mlflow_run_id, str(Path(tmp) / ARTIFACT_PATH), artifact_path=ARTIFACT_PATH)


def export_pyfunc_model(run_dir: str | Path, out: str | Path) -> Path:
    """``unipt export RUN --out DIR --mlflow``: the run's model as an MLflow pyfunc model folder at ``out``
    (new or empty), for ``mlflow models serve -m DIR`` or ``mlflow.register_model``; returns ``out``."""
    require("mlflow", "unipt export --mlflow")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UniptError(f"--out {out} is not empty; give a new folder")
    with tempfile.TemporaryDirectory(prefix="unipt-mlflow-") as tmp:
        folder = export_model(run_dir, Path(tmp) / "unipt-model")
        staging = Path(tmp) / "pyfunc"
        save_pyfunc_model(folder, staging)  # whole before it appears at out
        if out.exists():
            out.rmdir()
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(out))
    return out


def save_pyfunc_model(model_dir: str | Path, path: str | Path) -> Path:
    """An MLflow pyfunc model at ``path`` (new) wrapping the exported model folder ``model_dir``."""
    import mlflow.pyfunc

    spec = read_model_spec(model_dir)
    _check_servable(spec, Path(model_dir))
    try:
        version = importlib.metadata.version("unipt-cache")
        requirement = f"unipt-cache[tracking]=={version}"
    except importlib.metadata.PackageNotFoundError:  # a source checkout run without installing it
        requirement = "unipt-cache[tracking]"
    with warnings.catch_warnings():
        # An input example would make MLflow run the model (and load its backbone) while saving it.
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        mlflow.pyfunc.save_model(
            path=str(path),
            loader_module=LOADER_MODULE,
            data_path=str(model_dir),
            signature=_signature(spec),
            pip_requirements=[requirement],
            # The settings `mlflow.pyfunc.load_model(..., model_config=...)` may change (MLflow ignores
            # the others): where the backbone is on the serving machine, the device, the batch size.
            model_config=dict(LOAD_SETTINGS),
        )
    return Path(path)


def _check_servable(spec: ModelSpec, where: Path) -> None:
    from unipt.pipeline.tasks import get_task

    if get_task(spec.task).caches != 1 or spec.input not in ("text", "text_pair"):
        raise UniptError(
            f"model {where} is a {spec.task} model on {spec.input} inputs; the MLflow pyfunc model takes "
            "one-cache text models (classification, regression); use `unipt export` for this one"
        )


def input_columns(spec: ModelSpec) -> list[str]:
    """The input columns, by the names the model was trained with (else ``text``, ``text_pair``)."""
    names = [spec.columns.get("text", "text")]
    if spec.input == "text_pair":
        names.append(spec.columns.get("text_pair", "text_pair"))
    return names


def _signature(spec: ModelSpec) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = [ColSpec("string", name) for name in input_columns(spec)]
    if "id" in spec.columns:
        inputs.append(ColSpec("string", spec.columns["id"], required=False))
    if spec.task == "regression":
        outputs = [ColSpec("string", "example_id"), ColSpec("double", "value")]
    else:
        outputs = [ColSpec("string", "example_id"), ColSpec("string", "label")]
        outputs += [ColSpec("double", f"prob_{name}") for name in spec.label_names]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))
