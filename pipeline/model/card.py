"""``README.md``, the model card of every tuned-model folder (a run's and an exported one).

Written from ``model.json`` alone, so a run folder and its export say the same. A YAML front matter like
Hugging Face model cards (``library_name``, ``tags``, ``pipeline_tag``, ``metrics``, ``base_model`` when
the backbone is a hub id), then what a person asks first: the task and its labels, the metrics on val and
test beside the task's baselines, any warning the run raised, the backbone and its identity, the data
fingerprint and cache key, and how to load it. ``model.json`` stays the machine-readable description.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from unipt.pipeline.errors import UniptError
from unipt.pipeline.tasks import get_task

CARD_FILE = "README.md"
LIBRARY_NAME = "unipt-cache"

# Hugging Face's names for the metrics unipt reports (the card's front matter); others keep unipt's.
_HF_METRIC = {"acc": "accuracy", "f1": "f1", "mse": "mse", "pearson": "pearsonr", "spearman": "spearmanr"}
# Hugging Face's pipeline tag by what the backbone reads.
_PIPELINE_TAG = {
    "text": "text-classification",
    "text_pair": "text-classification",
    "image": "image-classification",
}


def front_matter(spec: Any) -> dict[str, Any]:
    """The card's YAML header for a :class:`unipt.pipeline.model.files.ModelSpec`."""
    info = get_task(spec.task)
    backbone = str(spec.backbone.get("name_or_path", ""))
    header: dict[str, Any] = {
        "library_name": LIBRARY_NAME,
        "tags": ["unipt", "parameter-efficient-fine-tuning", spec.method, spec.task],
        "metrics": [_HF_METRIC.get(m, m) for m in info.metrics],
    }
    if spec.task in ("classification", "regression"):
        header["pipeline_tag"] = _PIPELINE_TAG.get(spec.input, "text-classification")
    if _is_hub_id(backbone):  # a local path names nothing on the hub
        header["base_model"] = backbone
    return header


def _is_hub_id(name: str) -> bool:
    return bool(name) and not name.startswith(("/", ".", "~")) and "\\" not in name and name.count("/") <= 1


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    return "nan" if not math.isfinite(value) else f"{value:.4f}"


def metrics_table(spec: Any) -> list[str]:
    """Markdown rows: the model's metrics on val and test, then each baseline's."""
    info = get_task(spec.task)
    metrics = spec.metrics or {}
    rows = ["| model | metric | val | test |", "|---|---|---|---|"]
    for prefix, name in (("", "this model"), *((f"{p}_", label) for p, label in info.baselines)):
        for metric in info.metrics:
            val, test = metrics.get(f"{prefix}val_{metric}"), metrics.get(f"{prefix}test_{metric}")
            if val is None and test is None:
                continue
            rows.append(f"| {name} | {metric} | {_number(val)} | {_number(test)} |")
    return rows if len(rows) > 2 else ["No metrics were recorded with this model."]


def model_card(spec: Any, folder_hint: str = "MODEL_DIR") -> str:
    """The text of ``README.md`` for ``spec``; ``folder_hint`` is the folder the usage lines name."""
    b = spec.backbone
    labels = ", ".join(f"`{name}`" for name in spec.label_names) if spec.task != "regression" else "a number"
    columns = ", ".join(f"{role}: `{name}`" for role, name in sorted(spec.columns.items())) or "not recorded"
    lines = [
        "---",
        yaml.safe_dump(front_matter(spec), sort_keys=False).rstrip(),
        "---",
        "",
        f"# UniPT {spec.task} model on {b.get('name_or_path')}",
        "",
        f"A {spec.method} side network ({spec.variant}) and a {spec.task} head, trained with unipt-cache on "
        "cached activations of the frozen backbone below. It needs that backbone (the same files: they "
        "are checked by hash) to predict on raw inputs.",
        "",
        "## Task",
        "",
        f"- task: {spec.task}; reads: {spec.input}; outputs: {labels}",
        f"- columns it was trained on: {columns}",
        f"- best epoch: {spec.metrics.get('best_epoch', '–')} of {spec.metrics.get('epochs', '–')}",
        "",
        "## Metrics",
        "",
        *metrics_table(spec),
        "",
    ]
    if spec.warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in spec.warnings), ""]
    lines += [
        "## Backbone",
        "",
        f"- name or path: `{b.get('name_or_path')}`; revision: `{b.get('revision') or 'none recorded'}`",
        f"- weights sha256: `{b.get('weights_sha256')}`",
        f"- model type: {b.get('model_type')}; tokenizer: {b.get('tokenizer')}",
        f"- layers read: {spec.layers}; cache dtype: {spec.dtype}; max length: {spec.max_length}; "
        f"autocast: {spec.autocast}",
        "",
        "## Data",
        "",
        f"- dataset fingerprint: `{spec.dataset_fingerprint}`",
        f"- cache key: `{spec.cache_key}`",
        f"- run id: `{spec.run_id}`",
        "",
        "## How to use",
        "",
        "```bash",
        f"unipt predict {folder_hint} --input inputs.csv --out predictions.csv",
        f"unipt evaluate {folder_hint} --input labelled.csv",
        "```",
        "",
        "```python",
        "from unipt.pipeline.model.predict import TunedModel",
        "",
        f'model = TunedModel.from_pretrained("{folder_hint}")',
        'print(model.predict(["an input"]).rows())',
        "```",
        "",
    ]
    return "\n".join(lines)


def read_card(directory: str | Path) -> tuple[dict[str, Any], str]:
    """(front matter, body) of a folder's ``README.md``."""
    path = Path(directory) / CARD_FILE
    try:
        text = path.read_text()
    except OSError as exc:
        raise UniptError(f"{path} is not readable ({exc.strerror}); export the model again") from exc
    head, sep, body = text.removeprefix("---\n").partition("\n---\n")
    if not text.startswith("---\n") or not sep:
        raise UniptError(f"{path} has no YAML front matter; export the model again")
    header = yaml.safe_load(head)
    if not isinstance(header, dict):
        raise UniptError(f"{path}: the front matter is not a mapping; export the model again")
    return header, body
