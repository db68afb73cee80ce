"""A dataset file (CSV, TSV, JSONL, Parquet) read into raw examples: the columns ``dataset.*_column``
name, refused in one line when the file is missing, unparsable or not UTF-8."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from unipt.pipeline.config import DatasetConfig
from unipt.pipeline.data.images import load_image
from unipt.pipeline.data.raw_examples import RawExamples
from unipt.pipeline.errors import UniptError


def read_table_file(path: Path, config: DatasetConfig) -> RawExamples:
    if path.is_dir():
        found = sorted(
            p.name for p in path.iterdir() if p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".parquet")
        )
        hint = f" (it holds {', '.join(found[:3])}{', ...' if len(found) > 3 else ''})" if found else ""
        raise UniptError(
            f"dataset.source {path} is a directory{hint}; set it to one .csv/.tsv/.jsonl/.parquet file"
        )
    if not path.is_file():
        raise UniptError(
            f"dataset file {path} not found; set dataset.source to an existing .csv/.jsonl/.parquet"
        )
    suffixes = "".join(path.suffixes).lower()
    try:
        if ".parquet" in suffixes:
            table = pq.read_table(path)
        elif ".jsonl" in suffixes or ".json" in suffixes:
            table = pa_json.read_json(path)
        elif ".csv" in suffixes or ".tsv" in suffixes:
            delimiter = "\t" if ".tsv" in suffixes else ","
            table = pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(delimiter=delimiter))
        else:
            raise UniptError(f"dataset file {path} has an unknown format; use .csv, .tsv, .jsonl or .parquet")
    except pa.ArrowInvalid as exc:
        message = str(exc).splitlines()[0]
        if "UTF8" in message or "utf8" in message.lower():
            raise UniptError(
                f"dataset file {path} is not valid UTF-8 ({message}); re-encode it as UTF-8"
            ) from exc
        raise UniptError(f"dataset file {path} could not be parsed: {message}") from exc

    _check_utf8(table, path, binary_is_text=".csv" in suffixes or ".tsv" in suffixes)

    def column(name: str | None, setting: str) -> list | None:
        if name is None:
            return None
        if name not in table.column_names:
            raise UniptError(
                f"column {name!r} not found in {path} (columns: {', '.join(table.column_names)}); "
                f"set dataset.{setting}"
            )
        return table.column(name).to_pylist()

    if config.text_column is None and config.image_column is None:
        raise UniptError("dataset.text_column and dataset.image_column are both null; name at least one")
    images = column(config.image_column, "image_column")
    return RawExamples(
        texts=column(config.text_column, "text_column"),
        text_pairs=column(config.text_pair_column, "text_pair_column"),
        images=None if images is None else [load_image(v, path.parent, i) for i, v in enumerate(images)],
        labels=column(config.label_column, "label_column"),
        ids=column(config.id_column, "id_column"),
        groups=column(config.split.group_column, "split.group_column"),
        splits=column(config.split_column, "split_column"),
    )


def _check_utf8(table: pa.Table, path: Path, binary_is_text: bool) -> None:
    """Arrow does not always refuse invalid UTF-8: a CSV column holding it comes back as bytes, a JSON
    one as a string column that breaks only when read. Find it here and say where it is."""
    for name, column in zip(table.column_names, table.columns, strict=True):
        kind = column.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            try:
                column.validate(full=True)
                continue
            except pa.ArrowInvalid:
                values = column.cast(pa.large_binary() if pa.types.is_large_string(kind) else pa.binary())
        elif binary_is_text and (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            values = column
        else:
            continue
        for row, value in enumerate(values.to_pylist()):
            try:
                (value or b"").decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UniptError(
                    f"dataset file {path} is not valid UTF-8 (column {name!r}, row {row}: byte "
                    f"{value[exc.start]:#04x}); re-encode it as UTF-8"
                ) from exc
