"""Hugging Face datasets as sources: hf-disk:PATH (save_to_disk folders) and hf:NAME[:CONFIG] (hub ids or
local dataset folders, read through the local cache), normalised to the same table and fingerprint as
the same rows in a file; offline and not cached is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pytest

datasets = pytest.importorskip("datasets")  # the [hf-datasets] extra; setup.sh installs it, so CI runs these

from tests.conftest import make_sentiment_rows  # noqa: E402
from unipt.pipeline.config import DatasetConfig  # noqa: E402
from unipt.pipeline.data.table import load_dataset  # noqa: E402
from unipt.pipeline.errors import UniptError  # noqa: E402

SPLITS = {"train": range(0, 60), "validation": range(60, 80), "test": range(80, 100)}


def _rows() -> list[dict[str, str]]:
    return make_sentiment_rows(100)


def _dataset_dict(extra_split: bool = False) -> datasets.DatasetDict:
    rows = _rows()
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["neg", "pos"]),
        }
    )
    parts = {
        split: datasets.Dataset.from_list([rows[i] for i in indices], features=features)
        for split, indices in SPLITS.items()
    }
    if extra_split:  # like IMDB's "unsupervised": no split of ours
        parts["unsupervised"] = datasets.Dataset.from_list(rows[:5], features=features)
    return datasets.DatasetDict(parts)


def _csv_with_splits(path: Path) -> Path:
    """The same rows as one CSV, in another order, with a split column: the file form of the dataset."""
    rows = _rows()
    split_of = {i: split for split, indices in SPLITS.items() for i in indices}
    order = list(reversed(range(len(rows))))
    table = pa.table(
        {
            "id": [rows[i]["id"] for i in order],
            "text": [rows[i]["text"] for i in order],
            "label": [rows[i]["label"] for i in order],
            "split": [split_of[i] for i in order],
        }
    )
    pa_csv.write_csv(table, path)
    return path


def test_a_save_to_disk_folder_keeps_its_splits_and_class_names_and_fingerprints_like_the_file(tmp_path):
    folder = tmp_path / "reviews_hf"
    _dataset_dict().save_to_disk(str(folder))

    from_hf = load_dataset(DatasetConfig(source=f"hf-disk:{folder}", id_column="id"))
    assert from_hf.label_names == ["neg", "pos"]  # the ClassLabel's names, not 0/1
    assert from_hf.split_counts() == {"train": 60, "val": 20, "test": 20}  # the dataset's own splits
    by_id = dict(
        zip(
            from_hf.table.column("example_id").to_pylist(),
            from_hf.table.column("split").to_pylist(),
            strict=True,
        )
    )
    assert by_id["r0000"] == "train" and by_id["r0065"] == "val" and by_id["r0099"] == "test"

    csv = _csv_with_splits(tmp_path / "reviews.csv")
    from_file = load_dataset(DatasetConfig(source=str(csv), id_column="id", split_column="split"))
    assert from_hf.fingerprint == from_file.fingerprint  # content, not format or row order
    assert from_hf.table.equals(from_file.table)


def test_one_edited_row_changes_the_fingerprint(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    _dataset_dict().save_to_disk(str(first))
    edited = _dataset_dict()
    edited["test"] = edited["test"].map(
        lambda row, i: {"text": row["text"] + ("!" if i == 0 else "")}, with_indices=True
    )
    edited.save_to_disk(str(second))
    fp = [
        load_dataset(DatasetConfig(source=f"hf-disk:{p}", id_column="id")).fingerprint
        for p in (first, second)
    ]
    assert fp[0] != fp[1]


def test_splits_that_are_not_train_val_test_are_left_out_and_named(tmp_path, caplog):
    folder = tmp_path / "with_unsupervised"
    _dataset_dict(extra_split=True).save_to_disk(str(folder))
    with caplog.at_level("INFO", logger="unipt"):
        table = load_dataset(DatasetConfig(source=f"hf-disk:{folder}", id_column="id"))
    assert len(table) == 100
    assert "left out split(s) unsupervised" in caplog.text


def test_a_single_split_dataset_is_split_by_the_config_and_split_column_wins_over_own_splits(tmp_path):
    single = tmp_path / "single"
    rows = _rows()
    datasets.Dataset.from_list(rows).save_to_disk(str(single))
    table = load_dataset(DatasetConfig(source=f"hf-disk:{single}", id_column="id"))
    counts = table.split_counts()
    assert sum(counts.values()) == 100 and all(counts[s] > 0 for s in ("train", "val", "test"))

    # split_column: the rows' own column decides, whatever splits the DatasetDict has.
    marked = [
        {**row, "fold": "test" if i % 5 == 0 else "val" if i % 5 == 1 else "train"}
        for i, row in enumerate(rows)
    ]
    folder = tmp_path / "marked"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(marked[:50]), "test": datasets.Dataset.from_list(marked[50:])}
    ).save_to_disk(str(folder))
    by_column = load_dataset(DatasetConfig(source=f"hf-disk:{folder}", id_column="id", split_column="fold"))
    assert by_column.split_counts() == {"train": 60, "val": 20, "test": 20}


def test_hf_name_reads_a_local_dataset_folder_with_its_splits(tmp_path):
    """hf:NAME goes through datasets.load_dataset, as a hub id does; a local folder of split files needs no
    network. The table and fingerprint equal the save_to_disk copy's."""
    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    rows = _rows()
    for split, indices in SPLITS.items():
        part = [rows[i] for i in indices]
        pa_csv.write_csv(pa.Table.from_pylist(part), folder / "data" / f"{split}.csv")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    script = (
        "from unipt.pipeline.config import DatasetConfig\n"
        "from unipt.pipeline.data.table import load_dataset\n"
        f"t = load_dataset(DatasetConfig(source='hf:{folder}', id_column='id'))\n"
        "print(t.fingerprint, t.split_counts(), t.label_names)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    fingerprint, *_ = out.stdout.split()
    assert "{'train': 60, 'val': 20, 'test': 20}" in out.stdout
    # The CSV files hold the labels as names: the same rows as the ClassLabel dataset, the same fingerprint.
    disk = tmp_path / "disk"
    _dataset_dict().save_to_disk(str(disk))
    assert fingerprint == load_dataset(DatasetConfig(source=f"hf-disk:{disk}", id_column="id")).fingerprint


def test_offline_and_not_cached_is_one_line(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty_hf_home"), "HF_HUB_OFFLINE": "1"}
    script = (
        "from unipt.pipeline.config import DatasetConfig\n"
        "from unipt.pipeline.data.table import load_dataset\n"
        "from unipt.pipeline.errors import UniptError\n"
        "try:\n"
        "    load_dataset(DatasetConfig(source='hf:unipt-tests/not-cached-anywhere', revision='main'))\n"
        "except UniptError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = out.stdout.splitlines()
    assert line.startswith(
        "dataset.source hf:unipt-tests/not-cached-anywhere: unipt-tests/not-cached-anywhere"
    )
    assert "not in the local Hugging Face cache" in line and "hf-disk:PATH" in line


@pytest.mark.slow
def test_offline_and_not_cached_is_one_cli_line(tmp_path):
    pytest.importorskip("torch")  # the CLI loads the training stage; Python 3.12 CI runs the test above only
    config = tmp_path / "hf.yaml"
    config.write_text(
        "name: hf\n"
        "dataset: {source: 'hf:unipt-tests/not-cached-anywhere'}\n"
        "backbone: {name_or_path: /no/backbone/needed}\n"
        f"storage: {{cache_root: '{tmp_path}/c', runs_root: '{tmp_path}/r', registry: '{tmp_path}/r.db'}}\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty_hf_home"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "unipt.pipeline.cli", "extract", str(config)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("unipt: error: dataset.source hf:unipt-tests/not-cached-anywhere:")


def test_bad_hf_sources_are_one_line(tmp_path):
    with pytest.raises(UniptError, match="no folder"):
        load_dataset(DatasetConfig(source=f"hf-disk:{tmp_path / 'missing'}"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(UniptError, match="not a datasets save_to_disk folder"):
        load_dataset(DatasetConfig(source=f"hf-disk:{tmp_path / 'plain'}"))
    with pytest.raises(UniptError, match="revision applies to hf:NAME sources"):
        load_dataset(DatasetConfig(source=f"hf-disk:{tmp_path / 'plain'}", revision="v1"))
    with pytest.raises(UniptError, match="revision applies to hf:NAME sources"):
        load_dataset(DatasetConfig(source=str(tmp_path / "x.csv"), revision="v1"))
    folder = tmp_path / "reviews_hf"
    _dataset_dict().save_to_disk(str(folder))
    with pytest.raises(UniptError, match="column 'review' not found .* set dataset.text_column"):
        load_dataset(DatasetConfig(source=f"hf-disk:{folder}", text_column="review"))
