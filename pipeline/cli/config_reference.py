"""docs/configuration.md, generated from the config's fields: ``python -m
unipt.pipeline.cli.config_reference``.

Each field's description in :mod:`unipt.pipeline.config` is the one place a setting is documented;
``tests/test_docs.py`` fails when the committed page no longer matches what this prints.
"""

from __future__ import annotations

import sys
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from unipt.pipeline.config import (
    AMP_ALIASES,
    BEFORE_IT_EXISTED,
    RENAMED,
    ExperimentConfig,
    section_model,
)

INTRO = """# Configuration reference

Generated from the field descriptions in `pipeline/config/` by `python -m
unipt.pipeline.cli.config_reference >
docs/configuration.md`; `tests/test_docs.py` keeps it current. Configs are YAML, validated strictly: an
unknown key or a wrong type is one line, never a silent default. Any value can be overridden on the command
line with `--set section.key=value` (e.g. `--set train.epochs=3`, `--set backbone.layers=[0,3,6]`).

Required: `dataset.source` and `backbone.name_or_path` (or a `backbones` mapping). Everything else has the
default shown. *changes* says what another value changes: *the cache* (a setting in the cache key, or in
the dataset's fingerprint: another value is another cache), *training* (what training computes: a
checkpoint resumes only with the same value), or nothing (where files go, speed, memory, what else is
reported). `configs/rt_minilm.yaml` is the default experiment; `configs/my_data.yaml` the smallest
config for your own CSV.

Any Hugging Face encoder works through `from_pretrained(name_or_path)`: a local folder, or a hub id when the
machine can reach the hub (the files are fetched once with `huggingface_hub.snapshot_download` and hashed for
the cache key). Weights load from safetensors only, unless `backbone.allow_pickle: true` (and even then
through `torch.load(weights_only=True)`); model code shipped with the weights runs only with
`backbone.trust_remote_code: true` in the config you run.
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is dict:
        return "mapping"
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and not origin:
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("|", "\\|")


def _default(field: Any) -> str:
    if field.json_schema_extra and "default_text" in field.json_schema_extra:
        return str(field.json_schema_extra["default_text"])
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{value!r}`" if value is not None else "`null`"


def _rows(model: type[BaseModel], prefix: str) -> tuple[list[str], list[tuple[str, type[BaseModel]]]]:
    rows, sections = [], []
    for name, field in model.model_fields.items():
        section = section_model(field.annotation)
        if section is not None:
            sections.append((prefix + name, section))
            continue
        annotation = field.annotation
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        changes = _CHANGES[(field.json_schema_extra or {}).get("affects")]  # type: ignore[union-attr]
        rows.append(
            f"| `{prefix}{name}` | {_type_name(annotation)} | {_default(field)} | {changes} | {description} |"
        )
    return rows, sections


# The ``changes`` column: what a field declares it affects (unipt.pipeline.config.declared).
_CHANGES = {"cache": "the cache", "training": "training", None: "—"}


def reference() -> str:
    """The whole page, as markdown."""
    out = [INTRO]
    pending: list[tuple[str, type[BaseModel]]] = [("", ExperimentConfig)]
    while pending:
        prefix, model = pending.pop(0)
        rows, sections = _rows(model, f"{prefix}." if prefix else "")
        title = prefix or "top level"
        doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
        out.append(f"\n## `{title}`\n")
        if doc and prefix:
            out.append(f"{doc}\n")
        out.append("\n| key | type | default | changes | what it does |\n| --- | --- | --- | --- | --- |\n")
        out.append("\n".join(rows) + "\n")
        pending.extend(sections)
    return "".join(out) + _older_versions()


def _older_versions() -> str:
    """The compatibility rules (:mod:`unipt.pipeline.config.compat`), from its tables."""
    renamed = [f"`{section}.{old}` is `{section}.{new}`" for (section, old), new in RENAMED.items()]
    renamed += [f"`train.amp: {old}` is `{new}`" for old, new in AMP_ALIASES.items()]
    absent = [f"`{'.'.join(path)}`: `{_yaml(value)}`" for path, value in BEFORE_IT_EXISTED]
    return (
        "\n## Configs written by older versions\n\n"
        "Old names still load, in a file (with a deprecation warning naming the new one) and in a run "
        "record, checkpoint or sweep state: " + "; ".join(renamed) + ".\n\n"
        "A run record, checkpoint or sweep state stores every setting its version had, so one it lacks did "
        "not exist yet: `unipt rerun`, a resumed checkpoint or sweep, and `unipt train --cache` reusing a "
        "run's settings give it what that version computed, not today's default: "
        + "; ".join(absent)
        + ". A config file that lacks one gets the default above. A cache made before `extract.autocast` "
        "existed ran its backbone in float32 (`none`), and one that does not record its `layers`, "
        "`max_length` or `dtype` holds every layer, its layout's length and its arrays' dtype.\n"
    )


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


if __name__ == "__main__":
    sys.stdout.write(reference())
