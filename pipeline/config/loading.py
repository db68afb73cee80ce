"""Reading a config: a YAML file, ``--set key=value`` overrides, the compatibility rules, validation;
every problem is one line naming the key to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from unipt.pipeline.config.compat import upgrade
from unipt.pipeline.config.experiment_config import ExperimentConfig
from unipt.pipeline.errors import UniptError


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.epochs=3`` -> (['train', 'epochs'], 3); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UniptError(f"override {text!r} is not KEY=VALUE; write it like --set train.epochs=3")
    return key.split("."), parse_value(value, f"--set {key}", "--set train.epochs=3")


def parse_value(value: str, where: str, example: str) -> Any:
    """A ``--set``/``--grid`` value as YAML (``3``, ``[0, 3, 6]``, ``null``); one line if it is not."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UniptError(
            f"{where}: value {value!r} is not valid YAML ({problem}); write a number, a list like [0, 3] or "
            f"a plain word, quoting text that starts with a symbol (e.g. {example})"
        ) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UniptError(f"override {text!r}: {part!r} is not a section of the config")
        node[path[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise UniptError(f"config file {path} not found; pass a YAML file such as configs/rt_minilm.yaml")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UniptError(_yaml_problem(path, text, exc)) from None
    if not isinstance(raw, dict):
        raise UniptError(f"config {path} must be a mapping of sections (dataset, backbone, ...)")
    raw = upgrade(apply_overrides(raw, overrides or []))  # old names still load, said so
    raw.setdefault("name", path.stem)  # a config named my_data.yaml is experiment "my_data"
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise UniptError(f"config {path}: {_describe(exc)}") from exc


def validate_stored(raw: dict[str, Any], whose: str) -> ExperimentConfig:
    """A config unipt stored for ``whose`` (``run 1a2b``: a run record; a sweep's state), upgraded by the
    compatibility rules (it may be an older unipt's) and validated; one line when it no longer validates."""
    try:
        return ExperimentConfig.model_validate(upgrade(raw, stored=True))
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise UniptError(
            f"the config stored for {whose} no longer validates ({where}: {problem['msg']}); "
            "use the unipt version that made it"
        ) from exc


def _yaml_problem(path: Path, text: str, exc: yaml.YAMLError) -> str:
    """``config c.yaml line 4, column 1: <problem>; <fix>``: the file's name, not PyYAML's
    ``<unicode string>``, and no raw tab or multi-line excerpt."""
    mark = getattr(exc, "problem_mark", None)
    lines = text.splitlines()
    where = f"config {path}" + (
        f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    )
    line = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
    indent = line[: len(line) - len(line.lstrip())]
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if "\t" in problem or "\t" in indent:
        return f"{where}: YAML does not allow tabs for indentation; indent with spaces"
    return (
        f"{where}: not valid YAML ({problem}); fix that line (YAML nests sections by indenting with spaces)"
    )


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = "unknown key (check the spelling)" if error["type"] == "extra_forbidden" else error["msg"]
        if error["type"] != "extra_forbidden" and isinstance(error.get("input"), (str, int, float)):
            message += f", got {error['input']!r:.40}"  # the value to fix, as it was read
        problems.append(f"{where}: {message}")
    return "; ".join(problems)
