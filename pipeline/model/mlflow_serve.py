"""What MLflow imports to load a unipt pyfunc model (the ``loader_module`` that
:mod:`unipt.pipeline.model.mlflow_export`
writes into ``MLmodel``): the exported folder becomes a :class:`unipt.pipeline.model.predict.TunedModel`,
which predicts from a DataFrame of texts as ``unipt predict`` does. Loading reads data only (see
:mod:`unipt.pipeline.model.mlflow_export` for why it is a loader module).
"""

from __future__ import annotations

from typing import Any

from unipt.pipeline.errors import UniptError
from unipt.pipeline.model.mlflow_export import LOAD_SETTINGS, input_columns


class UniptPyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: raw texts in, ``unipt predict``'s rows out."""

    def __init__(self, model: Any, batch_size: int) -> None:
        self.model = model  # a unipt.pipeline.model.predict.TunedModel
        self.batch_size = batch_size

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        inputs, ids = self._inputs(model_input)
        predictions = self.model.predict(inputs, ids, batch_size=self.batch_size)
        return pd.DataFrame(predictions.rows())

    def _inputs(self, model_input: Any) -> tuple[list, list[str] | None]:
        import pandas as pd

        spec = self.model.spec
        columns = input_columns(spec)
        # MLflow checks the input against the signature first and hands over a DataFrame with them.
        if not isinstance(model_input, pd.DataFrame):
            kind = type(model_input).__name__
            raise UniptError(f"give a DataFrame with the column(s) {columns}, not a {kind}")
        missing = [c for c in columns if c not in model_input.columns]
        if missing:
            raise UniptError(
                f"the input has no column {missing[0]!r} (it has {list(model_input.columns)}); this model "
                f"reads {columns}"
            )
        if spec.input == "text_pair":
            inputs: list = list(zip(*(model_input[c].astype(str) for c in columns), strict=True))
        else:
            inputs = model_input[columns[0]].tolist()
        id_column = spec.columns.get("id")
        ids = None
        if id_column and id_column in model_input.columns:
            ids = model_input[id_column].astype(str).tolist()
        return inputs, ids


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> UniptPyfunc:
    """MLflow's entry point for a loader-module model: the exported folder in ``data_path``."""
    from unipt.pipeline.model.predict import TunedModel

    settings = {**LOAD_SETTINGS, **(model_config or {})}
    unknown = sorted(set(settings) - set(LOAD_SETTINGS))
    if unknown:  # only a hand-edited MLmodel gets here: MLflow drops keys the model was not saved with
        raise UniptError(
            f"model_config {unknown[0]!r} is not a setting of this model; give {', '.join(LOAD_SETTINGS)}"
        )
    model = TunedModel.from_pretrained(data_path, device=settings["device"], backbone=settings["backbone"])
    return UniptPyfunc(model, int(settings["batch_size"]))
