"""Loading, splitting and fingerprinting datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.conftest import make_sentiment_rows, write_csv
from unipt.pipeline.config import DatasetConfig, SplitConfig
from unipt.pipeline.data.table import load_dataset
from unipt.pipeline.errors import UniptError


@pytest.mark.slow  # the bundled data set
def test_rotten_tomatoes_is_split_by_movie():
    ds = load_dataset(DatasetConfig(source="bundled:rotten_tomatoes"))
    assert ds.label_names == ["fresh", "rotten"]
    assert 12_000 < len(ds) < 13_000  # critic snippets only: the "plot" rows are dropped
    counts = ds.split_counts()
    assert counts["train"] > 8 * counts["test"] / 2 and counts["val"] > 0 and counts["test"] > 0
    # Every movie's snippets land in exactly one split, so no movie leaks from train into test.
    import pyarrow.csv as pa_csv

    from unipt.pipeline.data.bundled import bundled_data_path

    raw = pa_csv.read_csv(bundled_data_path("bundled:rotten_tomatoes")).to_pylist()
    movie_of = {}
    for row in raw:
        if row["category"] != "plot":
            movie_of.setdefault(" ".join(row["text"].split()), set()).add(row["movie_name"])
    split_of_movie: dict[str, set[str]] = {}
    for text, split in zip(
        ds.table.column("text").to_pylist(), ds.table.column("split").to_pylist(), strict=True
    ):
        movies = movie_of.get(" ".join(text.split()), set())
        if len(movies) == 1:  # a few snippets are quoted for several movies; skip those
            split_of_movie.setdefault(next(iter(movies)), set()).add(split)
    assert len(split_of_movie) > 400  # movies that have critic snippets
    assert all(len(splits) == 1 for splits in split_of_movie.values())


def test_fingerprint_ignores_file_order_and_format(tmp_path):
    rows = make_sentiment_rows(50)
    a = load_dataset(DatasetConfig(source=str(write_csv(tmp_path / "a.csv", rows)), id_column="id"))
    b = load_dataset(DatasetConfig(source=str(write_csv(tmp_path / "b.csv", rows[::-1])), id_column="id"))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows[10:] + rows[:10]))
    c = load_dataset(DatasetConfig(source=str(jsonl), id_column="id"))
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows[25:] + rows[:25]), tmp_path / "d.parquet")
    d = load_dataset(DatasetConfig(source=str(tmp_path / "d.parquet"), id_column="id"))
    assert a.fingerprint == b.fingerprint == c.fingerprint == d.fingerprint
    assert a.table.equals(b.table)


def test_fingerprint_changes_with_one_row_or_the_split(tmp_path):
    rows = make_sentiment_rows(50)
    base = load_dataset(DatasetConfig(source=str(write_csv(tmp_path / "a.csv", rows)), id_column="id"))
    rows[7] = {**rows[7], "text": rows[7]["text"] + " indeed"}
    edited = load_dataset(DatasetConfig(source=str(write_csv(tmp_path / "b.csv", rows)), id_column="id"))
    resplit = load_dataset(
        DatasetConfig(source=str(tmp_path / "a.csv"), id_column="id", split=SplitConfig(seed=1))
    )
    assert len({base.fingerprint, edited.fingerprint, resplit.fingerprint}) == 3


# A fixed six-row table as a user would write it, and its fingerprint, computed once (2026-12-07). The
# fingerprint is part of every cache key and run record: a new value means every cache and run made
# before no longer matches its data, so it may change only with a deliberate format change.
FIXED_CSV = """id,text,label
r0,a great film,pos
r1,a dull plot,neg
r2,the actors were superb,pos
r3,boring and tedious,neg
r4,"funny, and moving",pos
r5,weak story,neg
"""
FIXED_FINGERPRINT = "b13a90919c2cf8b9ad5fe45e65acf07b0cbd78284b7e57c484d83c4a1251798c"


def test_the_fingerprint_of_a_fixed_table_is_pinned_and_the_same_in_another_process(tmp_path):
    """Pinned, not compared within one process: another interpreter, with another string-hash seed,
    computes the same value."""
    path = tmp_path / "fixed.csv"
    path.write_text(FIXED_CSV)
    assert load_dataset(DatasetConfig(source=str(path), id_column="id")).fingerprint == FIXED_FINGERPRINT
    code = (
        "import sys\n"
        "from unipt.pipeline.config import DatasetConfig\n"
        "from unipt.pipeline.data.table import load_dataset\n"
        "print(load_dataset(DatasetConfig(source=sys.argv[1], id_column='id')).fingerprint)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == FIXED_FINGERPRINT


def test_limit_is_a_seeded_sample(tmp_path):
    path = write_csv(tmp_path / "a.csv", make_sentiment_rows(100))
    one = load_dataset(DatasetConfig(source=str(path), id_column="id", limit=30))
    two = load_dataset(DatasetConfig(source=str(path), id_column="id", limit=30))
    assert len(one) == 30 and one.fingerprint == two.fingerprint


@pytest.mark.parametrize(
    ("rows", "setting", "message"),
    [
        ([{"id": "1", "text": "ok", "label": "a"}], {"text_column": "body"}, "column 'body' not found"),
        (
            [{"id": "1", "text": "  ", "label": "a"}, {"id": "2", "text": "b", "label": "b"}],
            {},
            "text is empty",
        ),
        (
            [{"id": "1", "text": "x", "label": ""}, {"id": "2", "text": "y", "label": "b"}],
            {},
            "label is missing",
        ),
        (
            [{"id": "1", "text": "x", "label": "a"}, {"id": "1", "text": "y", "label": "b"}],
            {},
            "appears more than once",
        ),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, rows, setting, message):
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(UniptError, match=message):
        load_dataset(DatasetConfig(source=str(path), id_column="id", **setting))


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(UniptError, match="not found; set dataset.source"):
        load_dataset(DatasetConfig(source=str(tmp_path / "nope.csv")))
