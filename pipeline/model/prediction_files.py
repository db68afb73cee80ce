"""The files ``unipt predict`` and ``unipt evaluate`` read and write: raw inputs from a CSV, JSONL or
Parquet file, predictions as CSV or JSONL, and an evaluation as strict JSON."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unipt.pipeline.errors import UniptError
from unipt.pipeline.log import say
from unipt.pipeline.model.predictions import Predictions


@dataclass
class InputTable:
    ids: list[str]
    inputs: list
    labels: list | None


def read_inputs(
    path: str | Path,
    *,
    kind: str = "text",
    text_column: str = "text",
    text_pair_column: str = "text_pair",
    image_column: str = "image",
    id_column: str | None = None,
    id_column_required: bool = True,
    label_column: str | None = None,
) -> InputTable:
    """Raw inputs from a CSV, JSONL or Parquet file (ids default to the row numbers). An ``id_column`` not
    ``id_column_required`` (the model's own, not the person's) gives the row numbers, saying so, when the
    file lacks it."""
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq
    from pyarrow import ArrowException

    path = Path(path).expanduser()
    if not path.is_file():
        raise UniptError(f"input file {path} not found")
    readers = {".csv": pa_csv.read_csv, ".jsonl": pa_json.read_json, ".json": pa_json.read_json}
    readers[".parquet"] = pq.read_table
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise UniptError(
            f"input {path}: unknown format {path.suffix!r}; give a .csv, .jsonl or .parquet file"
        )
    try:
        table = reader(str(path))
    except ArrowException as exc:
        raise UniptError(f"input {path} is not readable ({str(exc).splitlines()[0]})") from exc
    column = image_column if kind == "image" else text_column
    if id_column and not id_column_required and id_column not in table.column_names:
        say(f"input {path} has no column {id_column!r} (the model's id column): ids are the row numbers")
        id_column = None
    second = text_pair_column if kind == "text_pair" else None
    wanted = [c for c in (column, second, id_column, label_column) if c]
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise UniptError(f"input {path} has no column {missing[0]!r} (columns: {table.column_names})")
    if table.num_rows == 0:
        raise UniptError(f"input {path} has no rows")
    values = table.column(column).to_pylist()
    if kind != "image":
        for name in (column, second) if second else (column,):
            texts = table.column(name).to_pylist()
            empty = [i for i, v in enumerate(texts) if not isinstance(v, str)]
            if empty:
                raise UniptError(f"input {path} row {empty[0]}: {name} is {texts[empty[0]]!r}, not text")
        if second:  # a text-pair model: (text, text_pair) tuples, as extraction gave them
            values = list(zip(values, table.column(second).to_pylist(), strict=True))
    else:
        from unipt.pipeline.data.images import load_image

        values = [load_image(v, path.parent, row) for row, v in enumerate(values)]
    ids = [str(v) for v in table.column(id_column).to_pylist()] if id_column else None
    labels = table.column(label_column).to_pylist() if label_column else None
    return InputTable(ids or [str(i) for i in range(table.num_rows)], values, labels)


def write_predictions(predictions: Predictions, out: str | Path) -> Path:
    """``out`` as CSV or JSONL (by its extension)."""
    out = Path(out).expanduser()
    rows = predictions.rows()
    if out.suffix.lower() not in (".csv", ".jsonl"):
        raise UniptError(f"--out {out}: give a .csv or .jsonl file")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".jsonl":
        out.write_text("".join(json.dumps(row, allow_nan=False) + "\n" for row in rows))
    else:
        with open(out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return out


def write_metrics(evaluation: dict[str, Any], out: str | Path) -> Path:
    """``unipt evaluate --out``: the evaluation as strict JSON (an undefined metric is null)."""
    from unipt.pipeline.runs.records import without_nan

    out = Path(out).expanduser()
    if out.suffix.lower() != ".json":
        raise UniptError(f"--out {out}: give a .json file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(without_nan(evaluation), indent=2, sort_keys=True, allow_nan=False) + "\n")
    tmp.replace(out)  # whole or not at all
    return out
