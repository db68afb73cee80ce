"""The tuned model as files: weights and ``model.json``, its model card, MLflow export, and prediction on
raw inputs with the backbone it was trained on.
"""

from unipt._lazy import lazy_surface

_SURFACE = {
    "CARD_FILE": "card",
    "read_card": "card",
    "MODEL_CARD": "files",
    "MODEL_WEIGHTS": "files",
    "ModelSpec": "files",
    "describe_model": "files",
    "export_model": "files",
    "model_directory": "files",
    "read_model_spec": "files",
    "write_model": "files",
    "export_pyfunc_model": "mlflow_export",
    "log_pyfunc_model": "mlflow_export",
    "TunedModel": "predict",
    "load_model": "predict",
    "InputTable": "prediction_files",
    "read_inputs": "prediction_files",
    "write_metrics": "prediction_files",
    "write_predictions": "prediction_files",
    "format_metrics": "predictions",
    "format_report": "predictions",
}
__all__ = sorted(_SURFACE)
__getattr__, __dir__ = lazy_surface(__name__, _SURFACE)
