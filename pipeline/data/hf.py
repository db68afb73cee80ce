"""Hugging Face ``datasets`` as dataset sources (the [hf-datasets] extra).

- ``hf:NAME[:CONFIG]``: ``datasets.load_dataset(NAME, CONFIG, revision=dataset.revision)``; NAME is a hub
  id (e.g. ``cornell-movie-review-data/rotten_tomatoes``) or a local dataset folder. Read from the local
  Hugging Face cache when it is there; offline and not cached is one line saying what to do.
- ``hf-disk:PATH``: ``datasets.load_from_disk(PATH)``, a folder written by ``save_to_disk``.

Either gives rows that :func:`unipt.pipeline.data.table.normalize` turns into the same table, with the same
fingerprint rules, as every other source: a CSV with the same rows has the same fingerprint.

Splits: a dataset with several splits keeps its own (``train``, ``validation``/``val``/``dev``, ``test``;
others, such as IMDB's ``unsupervised``, are left out and named), so numbers are comparable with other
work on the same dataset. ``dataset.split_column`` names a column to take splits from instead; a dataset
with a single split is split by ``dataset.split`` like a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from unipt.pipeline.config import DatasetConfig
from unipt.pipeline.data.raw_examples import RawExamples
from unipt.pipeline.errors import UniptError
from unipt.pipeline.extras import require
from unipt.pipeline.log import say

HF_PREFIX = "hf:"
HF_DISK_PREFIX = "hf-disk:"
_SPLIT_NAMES = {"train", "val", "valid", "validation", "dev", "test"}


def is_hf_source(source: str) -> bool:
    return source.startswith((HF_PREFIX, HF_DISK_PREFIX))


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """``hf:NAME[:CONFIG]`` -> (NAME, CONFIG or None)."""
    name, _, config_name = source.removeprefix(HF_PREFIX).partition(":")
    if not name:
        raise UniptError(f"dataset.source {source!r} names no dataset; write hf:NAME or hf:NAME:CONFIG")
    return name, config_name or None


def read_hf_source(config: DatasetConfig) -> Any:
    """The source's rows as :class:`unipt.pipeline.data.raw_examples.RawExamples`."""
    require("datasets", f"dataset.source {config.source}")
    import datasets

    loaded = _load_from_disk(config) if config.source.startswith(HF_DISK_PREFIX) else _load_hub(config)
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {None: loaded}
    own_splits = config.split_column is None and len(parts) > 1
    if own_splits:
        dropped = sorted(str(name) for name in parts if str(name).lower() not in _SPLIT_NAMES)
        if dropped:
            say(
                f"dataset {config.source}: left out split(s) {', '.join(dropped)} (not train/validation/test)"
            )
        parts = {name: part for name, part in parts.items() if str(name).lower() not in dropped}
    return _rows(parts, config, own_splits)


def _load_hub(config: DatasetConfig) -> Any:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    name, config_name = parse_hf_source(config.source)
    try:
        return datasets.load_dataset(name, config_name, revision=config.revision)
    except ConnectionError as exc:
        raise UniptError(
            f"dataset.source {config.source}: {name} is not in the local Hugging Face cache and the hub "
            f"cannot be reached ({_first_line(exc)}); load it once on a machine with network access (the "
            "cache is HF_HOME), or copy a save_to_disk folder here and use hf-disk:PATH"
        ) from None
    except DatasetNotFoundError as exc:
        raise UniptError(
            f"dataset.source {config.source}: {_first_line(exc)}; check the name (and dataset.revision), "
            "and log in with `hf auth login` for a gated dataset"
        ) from None
    except ValueError as exc:  # e.g. an unknown config name: datasets lists the available ones
        raise UniptError(f"dataset.source {config.source}: {_first_line(exc)}") from None


def _load_from_disk(config: DatasetConfig) -> Any:
    import datasets

    if config.revision is not None:
        raise UniptError(
            f"dataset.revision applies to hf:NAME sources, not {config.source}; drop it (a save_to_disk "
            "folder is one fixed version)"
        )
    path = Path(config.source.removeprefix(HF_DISK_PREFIX)).expanduser()
    if not path.is_dir():
        raise UniptError(
            f"dataset.source {config.source}: no folder {path}; save one with save_to_disk(PATH)"
        )
    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise UniptError(
            f"dataset.source {config.source}: {path} is not a datasets save_to_disk folder "
            f"({_first_line(exc)}); for data files use hf:{path} or the file itself"
        ) from None


def _rows(parts: dict[str | None, Any], config: DatasetConfig, own_splits: bool) -> Any:
    if config.text_column is None and config.image_column is None:
        raise UniptError("dataset.text_column and dataset.image_column are both null; name at least one")
    texts, labels, ids, groups, splits, images, text_pairs = [], [], [], [], [], [], []
    for split_name, part in parts.items():
        table = _arrow_table(part, config)
        n = table.num_rows

        def column(name: str | None, setting: str, table: pa.Table = table) -> list | None:
            if name is None:
                return None
            if name not in table.column_names:
                found = ", ".join(table.column_names)
                raise UniptError(
                    f"column {name!r} not found in {config.source} (columns: {found}); set dataset.{setting}"
                )
            return table.column(name).to_pylist()

        texts += column(config.text_column, "text_column") or []
        text_pairs += column(config.text_pair_column, "text_pair_column") or []
        labels += _label_values(part, column(config.label_column, "label_column"), config.label_column)
        ids += column(config.id_column, "id_column") or []
        groups += column(config.split.group_column, "split.group_column") or []
        splits += [split_name] * n if own_splits else column(config.split_column, "split_column") or []
        images += column(config.image_column, "image_column") or []
    return RawExamples(
        texts=texts if config.text_column is not None else None,
        text_pairs=text_pairs if config.text_pair_column is not None else None,
        labels=labels,
        ids=ids if config.id_column is not None else None,
        groups=groups if config.split.group_column is not None else None,
        splits=splits if (own_splits or config.split_column is not None) else None,
        images=_images(images) if config.image_column is not None else None,
    )


def _arrow_table(part: Any, config: DatasetConfig) -> pa.Table:
    """One split as an Arrow table; an Image column kept as its encoded bytes (decoded like a file's)."""
    import datasets

    column = config.image_column
    if column is not None and isinstance(part.features.get(column), datasets.Image):
        part = part.cast_column(column, datasets.Image(decode=False))
    return part.with_format("arrow")[:]


def _label_values(part: Any, values: list | None, column: str) -> list:
    """Labels as their class names when the column is a ClassLabel (so label_names read "neg", "pos",
    not 0, 1); -1 (no label) is kept out as None, which normalising refuses with the row."""
    import datasets

    assert values is not None
    feature = part.features.get(column)
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(v) if v is not None and v >= 0 else None for v in values]
    return values


def _images(values: list) -> list[dict]:
    from unipt.pipeline.data.images import load_image

    cells = [v.get("bytes") or v.get("path") if isinstance(v, dict) else v for v in values]
    return [load_image(cell, Path.cwd(), row) for row, cell in enumerate(cells)]


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
