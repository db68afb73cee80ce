"""The tuned model as files: ``model.safetensors`` (UniPT and the task head, the best epoch's weights)
and ``model.json`` (everything needed to rebuild it and feed it raw inputs).

``model.json`` says what the network is (variant, task, layers, hidden sizes, grids, embed size,
downsample factor, outputs, label names, regression target statistics), what it reads (the cache's
dtype, max length, preprocessing; the backbone's name, revision, weights/config/tokenizer hashes,
model type, tokenizer class, autocast) and where it came from (cache key, dataset fingerprint, run id,
metrics). Every training run writes both next to its record; ``unipt export`` copies them out.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UniptError

MODEL_WEIGHTS = "model.safetensors"
MODEL_CARD = "model.json"
MODEL_FORMAT = 1


@dataclass
class ModelSpec:
    """The contents of ``model.json``."""

    task: str
    variant: str
    num_outputs: int
    label_names: list[str]
    layers: list[int]
    hidden_sizes: dict[str, int]
    grids: dict[str, list[int]]
    embed_size: int | None
    downsample_factor: int
    dropout: float
    input: str  # "text", "image" or "text_pair" ((text, text_pair) tuples): what the backbone reads
    dtype: str  # the cache's storage dtype: predictions round activations to it
    max_length: int  # what extraction passed the backbone (tokens per image for image encoders)
    preprocessing: dict[str, Any]
    backbone: dict[str, Any]  # name_or_path, revision, hashes, model_type, tokenizer, trust/pickle flags
    autocast: str  # the backbone's compute precision at extraction
    batch_size: int  # the backbone batch size extraction used
    cache_key: str
    dataset_fingerprint: str
    method: str = "unipt"  # train.method: what network the weights belong to
    side_reduction: int = 8  # train.side_reduction (method lst)
    target: dict[str, float] | None = None  # regression: train-split mean and std of the label
    # The training data's columns by role (text, text_pair, image, label): predict and evaluate read the
    # same names from an input file unless told otherwise. Empty in models written before it.
    columns: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    format: int = MODEL_FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        if data.get("format") != MODEL_FORMAT:
            raise UniptError(
                f"model.json has format {data.get('format')}, this unipt reads {MODEL_FORMAT}; "
                "export it again with this version"
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def describe_model(
    attrs: dict[str, Any],
    reader_layers: list[int],
    hidden_sizes: dict[int, int],
    grids: dict[int, list[int]],
    label_names: list[str],
    layout_max_length: int,
    dtype: str,
    config: Any,
    num_outputs: int,
    target: dict[str, float] | None,
) -> ModelSpec:
    """The spec of a model trained on a cache with these attributes and ``config`` (ExperimentConfig)."""
    fields = attrs.get("key_fields", {})
    described = attrs.get("backbone", {})
    settings = config.primary_backbone
    backbone = {
        "name_or_path": settings.name_or_path,
        **fields.get("backbone", {}),
        "model_type": described.get("model_type"),
        "tokenizer": (attrs.get("tokenizer") or {}).get("class"),
        "image_size": described.get("image_size"),
        "trust_remote_code": settings.trust_remote_code,
        "allow_pickle": settings.allow_pickle,
    }
    input_kind = str(attrs.get("input") or described.get("input", "text"))  # the view says text_pair
    return ModelSpec(
        task=config.train.task,
        variant=config.train.variant,
        method=config.train.method,
        side_reduction=config.train.side_reduction,
        num_outputs=num_outputs,
        label_names=list(label_names),
        layers=list(reader_layers),
        hidden_sizes={str(k): int(v) for k, v in hidden_sizes.items()},
        grids={str(k): list(v) for k, v in grids.items()},
        embed_size=config.train.embed_size,
        downsample_factor=config.train.downsample_factor,
        dropout=config.train.dropout,
        input=input_kind,
        dtype=dtype,
        max_length=int(layout_max_length),
        preprocessing=dict(fields.get("preprocessing", {})),
        backbone=backbone,
        autocast=str(fields.get("autocast", "none")),
        batch_size=settings.batch_size,
        cache_key=str(attrs.get("cache_key", "")),
        dataset_fingerprint=str(attrs.get("dataset_fingerprint", "")),
        target=target,
        columns=training_columns(config.dataset, input_kind),
    )


def training_columns(dataset: Any, input_kind: str) -> dict[str, str]:
    """The columns ``dataset`` (a DatasetConfig) reads for a model whose backbone reads ``input_kind``, by
    role; only those it names. None for a config made from a cache alone: the cache does not record them,
    and the defaults would be a guess."""
    from pipeline.from_cache import CACHE_SOURCE

    if str(dataset.source).startswith(CACHE_SOURCE):
        return {}
    reads_text = input_kind != "image"  # an image model's text_column is only the config's default
    roles = {
        "text": dataset.text_column if reads_text else None,
        "text_pair": dataset.text_pair_column if reads_text else None,
        "image": dataset.image_column,
        "label": dataset.label_column,
    }
    return {role: str(name) for role, name in roles.items() if name}


def write_model(directory: str | Path, state: dict[str, Any], spec: ModelSpec) -> Path:
    """``model.safetensors`` and ``model.json`` in ``directory``; returns the weights' path."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Own, contiguous CPU copies: safetensors refuses tensors that share storage.
    tensors = {name: value.detach().cpu().contiguous().clone() for name, value in state.items()}
    save_file(tensors, str(directory / MODEL_WEIGHTS), metadata={"format": "pt", "unipt": str(MODEL_FORMAT)})
    text = json.dumps(spec.to_json(), indent=2, sort_keys=True, allow_nan=True)
    (directory / MODEL_CARD).write_text(text + "\n")
    return directory / MODEL_WEIGHTS


def read_model_spec(directory: str | Path) -> ModelSpec:
    path = Path(directory) / MODEL_CARD
    if not path.is_file() or not (Path(directory) / MODEL_WEIGHTS).is_file():
        raise UniptError(
            f"{directory} holds no tuned model ({MODEL_CARD} + {MODEL_WEIGHTS}); give a run id, a run "
            "directory or a folder written by `unipt export`"
        )
    try:
        return ModelSpec.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise UniptError(f"{path} is not a readable model description ({exc}); export the run again") from exc


def export_model(run_dir: str | Path, out: str | Path) -> Path:
    """Copy a run's model files into ``out`` (a new or empty folder); returns it."""
    spec = read_model_spec(run_dir)  # refuses a run without a model before anything is written
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UniptError(f"--out {out} is not empty; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(run_dir) / MODEL_WEIGHTS, out / MODEL_WEIGHTS)
    card = spec.to_json() | {"exported_from": str(Path(run_dir).resolve())}
    (out / MODEL_CARD).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return out
