"""Numbers a user can trust (issue 19): no duplicates leaked across splits, no selection on an empty split
or a NaN, imbalance visible (macro-F1, per-class scores, majority baseline), regression baselines, and
records that are strict JSON."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from tests.conftest import make_sentiment_rows, strict_json, write_config, write_csv
from unipt.pipeline.cli.app import main
from unipt.pipeline.config import DatasetConfig, SplitConfig, TrainConfig
from unipt.pipeline.data.table import load_dataset
from unipt.pipeline.experiment.rerun import stored_config
from unipt.pipeline.runs.records import finite_record, without_nan
from unipt.pipeline.runs.registry import RunEntry
from unipt.pipeline.tasks import get_task, select_metric
from unipt.train.metrics import accuracy, class_report, macro_f1, pearson, spearman

# --- 1. splits without leakage -----------------------------------------------------------------------------


def _rows_with_duplicates(n: int = 80) -> list[dict[str, str]]:
    """``n`` texts plus a copy (new id, same text and label) of every second one: 40 duplicates."""
    rows = make_sentiment_rows(n)
    return rows + [
        {"id": f"d{i:03d}", "text": rows[i]["text"], "label": rows[i]["label"]} for i in range(0, n, 2)
    ]


def _texts_by_split(ds) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for text, split in zip(
        ds.table.column("text").to_pylist(), ds.table.column("split").to_pylist(), strict=True
    ):
        out[split].add(text)
    return out


def test_identical_inputs_share_a_split_and_the_record_counts_them(tmp_path):
    path = write_csv(tmp_path / "dups.csv", _rows_with_duplicates())
    ds = load_dataset(DatasetConfig(source=str(path), id_column="id"))
    texts = _texts_by_split(ds)
    assert not texts["test"] & texts["train"] and not texts["val"] & texts["train"]
    assert ds.duplicates == {"repeated_inputs": 40, "extra_copies": 40, "val_in_train": 0, "test_in_train": 0}
    assert ds.split_scheme == 2
    # The old assignment (scheme 1, by example id) put copies apart: the leak this fixes.
    old = load_dataset(DatasetConfig(source=str(path), id_column="id", split=SplitConfig(scheme=1)))
    old_texts = _texts_by_split(old)
    assert old.duplicates["test_in_train"] == len(old_texts["test"] & old_texts["train"]) > 0


def test_copies_in_different_groups_merge_those_groups(tmp_path):
    rows = make_sentiment_rows(120)
    for i, row in enumerate(rows):
        row["movie"] = f"m{i // 3}"  # 40 movies of 3 snippets
    for i in range(0, 120, 6):  # the same snippet quoted for another movie
        rows.append(
            {"id": f"q{i}", "text": rows[i]["text"], "label": rows[i]["label"], "movie": f"m{i // 3 + 7}"}
        )
    path = write_csv(tmp_path / "movies.csv", rows)
    ds = load_dataset(
        DatasetConfig(source=str(path), id_column="id", split=SplitConfig(group_column="movie"))
    )
    assert ds.duplicates["test_in_train"] == ds.duplicates["val_in_train"] == 0
    split_of = dict(
        zip(ds.table.column("example_id").to_pylist(), ds.table.column("split").to_pylist(), strict=True)
    )
    for movie in {row["movie"] for row in rows}:  # and a movie still sits in one split
        assert len({split_of[row["id"]] for row in rows if row["movie"] == movie}) == 1


def test_scheme_1_is_the_split_and_fingerprint_of_old_runs(tmp_path):
    path = write_csv(tmp_path / "dups.csv", _rows_with_duplicates())
    ds = load_dataset(DatasetConfig(source=str(path), id_column="id", split=SplitConfig(scheme=1)))
    # Computed with the loader as it was before split schemes (commit 95068f6): old runs keep their data.
    assert ds.fingerprint == "af6cd4161825bf5e091cb5e7c87649018078e5afb1700d3f3f678b0de4f45212"
    assert ds.split_counts() == {"train": 101, "val": 12, "test": 7}
    now = load_dataset(DatasetConfig(source=str(path), id_column="id"))
    assert now.fingerprint != ds.fingerprint  # another split, another fingerprint (and cache key)


def test_rerun_of_a_run_made_before_split_schemes_keeps_scheme_1(tmp_path, tiny_config):
    import yaml

    config = yaml.safe_load(tiny_config.read_text())
    assert "scheme" not in config["dataset"]["split"]  # what an old record's config looks like
    fields = {name: None for name in RunEntry.__dataclass_fields__}
    old = RunEntry(**{**fields, "run_id": "old", "config": config, "runtime": {}})
    rerun = stored_config(old, str(tmp_path / "r.sqlite"))
    assert rerun.dataset.split.scheme == 1
    # Settings added later that change the batches: an old run's rerun gets what the old run computed.
    assert (rerun.train.length_grouping, rerun.train.loader_memory_mb) == (False, None)
    assert TrainConfig().loader_memory_mb == 512 and TrainConfig().length_grouping  # not the defaults
    # ... and read a view's examples in the order written (split, then id), not segment-row order.
    assert rerun.train.view_order == 1 and TrainConfig().view_order == 2


# --- 2. no selection on empty or NaN ---------------------------------------------------------------------


def _error_line(capsys, *argv: str) -> str:
    code = main([*argv, "--no-progress"])
    _, err = capsys.readouterr()
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("unipt: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize(
    ("overrides", "split"),
    [
        (["dataset.split.val=0", "dataset.split.train=0.8"], "val"),
        (["dataset.limit=3"], "val"),
    ],
)
def test_an_empty_val_split_is_refused_before_extraction(tmp_path, tiny_config, capsys, overrides, split):
    if split == "val" and "dataset.split.val=0" in overrides:
        overrides = [*overrides, "dataset.split.test=0.2"]
    argv = [arg for o in overrides for arg in ("--set", o)]
    line = _error_line(capsys, "run", str(tiny_config), *argv)
    assert f"gives an empty {split} split" in line and "raise dataset.limit" in line
    assert f"dataset.split.{split} fraction" in line and "split_column" in line
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_an_empty_test_split_is_refused(tmp_path, tiny_bert_dir, capsys):
    rows = make_sentiment_rows(40)
    for i, row in enumerate(rows):
        row["part"] = "train" if i < 30 else "val"
    data = write_csv(tmp_path / "d.csv", rows)
    config = write_config(
        tmp_path / "c.yaml", str(data), str(tiny_bert_dir), tmp_path, dataset={"split_column": "part"}
    )
    line = _error_line(capsys, "extract", str(config))
    assert "gives an empty test split (train 30, val 10, test 0)" in line
    assert not (tmp_path / "cache").exists()


def test_a_record_never_holds_nan():
    doc = finite_record(
        {"metrics": {"val_pearson": math.nan, "test_mse": 0.5}, "history": [{"val_spearman": math.inf}]}
    )
    text = json.dumps(doc, allow_nan=False)  # would raise on a NaN left behind
    assert strict_json(text)["metrics"]["val_pearson"] is None
    assert doc["undefined"]["metrics.val_pearson"].startswith("a correlation of constant predictions")
    assert "history[0].val_spearman" in doc["undefined"]
    # A rerun compares a fresh result with a recorded one the way the record keeps it.
    assert without_nan({"a": math.nan, "b": [math.inf, 1.0]}) == {"a": None, "b": [None, 1.0]}


# --- 3. imbalance visible ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(40))
def test_classification_metrics_match_scikit_learn(case):
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = random.Random(case)
    classes = rng.randint(2, 6)
    n = rng.randint(1, 60)
    # Some cases leave classes out of the labels or the predictions altogether.
    labels = torch.tensor([rng.randrange(classes if case % 3 else 2) for _ in range(n)])
    predictions = torch.tensor([rng.randrange(classes) if case % 4 else 0 for _ in range(n)])
    y, p = labels.tolist(), predictions.tolist()
    assert accuracy(predictions, labels) == pytest.approx(sklearn.accuracy_score(y, p))
    assert macro_f1(predictions, labels) == pytest.approx(
        sklearn.f1_score(y, p, average="macro", zero_division=0)
    )
    names = [f"c{i}" for i in range(classes)]
    report = class_report(predictions, labels, names)
    precision, recall, f1, support = sklearn.precision_recall_fscore_support(
        y, p, labels=list(range(classes)), zero_division=0
    )
    for i, name in enumerate(names):
        assert report["per_class"][name]["precision"] == pytest.approx(precision[i])
        assert report["per_class"][name]["recall"] == pytest.approx(recall[i])
        assert report["per_class"][name]["f1"] == pytest.approx(f1[i])
        assert report["per_class"][name]["support"] == support[i]
    assert report["confusion"] == sklearn.confusion_matrix(y, p, labels=list(range(classes))).tolist()


def test_macro_f1_ignores_a_class_absent_from_labels_and_predictions():
    labels, predictions = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 0])
    # Class 2 exists in the dataset but not in this split: it must not drag the mean down as a 0.
    assert macro_f1(predictions, labels) == pytest.approx((0.8 + 2 / 3) / 2)


@pytest.mark.parametrize("case", range(10))
def test_correlations_match_scipy(case):
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(case)
    x = torch.randint(0, 6, (30,), generator=g).double()  # ties on purpose
    y = x + torch.randn(30, generator=g, dtype=torch.float64)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x.numpy(), y.numpy())[0])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy())[0])


def test_select_metric_auto_follows_the_imbalance():
    info = get_task("classification")
    assert select_metric(info, "auto", 0.55)[0] == "acc"
    metric, why = select_metric(info, "auto", 0.87)
    assert metric == "f1" and "87% of train, above 60%" in why
    assert select_metric(info, "acc", 0.87) == ("acc", "train.select_metric")
    assert select_metric(get_task("regression"), "auto", None)[0] == "pearson"
    with pytest.raises(ValueError, match="select_metric 'pearson' is not a metric of task classification"):
        TrainConfig(select_metric="pearson")


def _imbalanced_rows(n: int = 150, positives: float = 0.15) -> list[dict[str, str]]:
    rows = make_sentiment_rows(n, seed=3)
    rng = random.Random(1)
    for row in rows:
        row["label"] = "pos" if rng.random() < positives else "neg"
    return rows


@pytest.mark.e2e
def test_an_imbalanced_run_shows_f1_baselines_and_per_class_scores(
    ray_session, tmp_path, tiny_bert_dir, capsys
):
    data = write_csv(tmp_path / "imbalanced.csv", _imbalanced_rows())
    config = write_config(tmp_path / "c.yaml", str(data), str(tiny_bert_dir), tmp_path, train={"epochs": 3})
    assert main(["run", str(config), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    (run_dir,) = (tmp_path / "runs").iterdir()
    record = strict_json((run_dir / "record.json").read_text())
    summary = out.strip().splitlines()[-1]
    m = record["metrics"]
    assert summary.startswith(f"test acc {m['test_acc']:.4f} f1 {m['test_f1']:.4f} (linear probe acc ")
    assert f"majority class acc {m['majority_test_acc']:.4f} f1 {m['majority_test_f1']:.4f})" in summary
    assert f"best epoch {m['best_epoch']} by val_f1" in summary
    assert "best epoch chosen by val_f1 (auto: the largest class is" in err
    assert record["task"]["select_metric"] == "f1"
    # The majority baseline predicts "neg" for everything: its accuracy is the share of neg in test.
    counts = record["dataset"]["class_counts"]
    assert m["majority_test_acc"] == pytest.approx(counts["test"]["neg"] / sum(counts["test"].values()))
    assert m["majority_test_f1"] < m["majority_test_acc"]
    assert {"probe_test_f1", "probe_val_f1", "probe_test_acc"} <= set(m)
    test_report = record["report"]["test"]
    assert test_report["labels"] == ["neg", "pos"]
    assert sum(map(sum, test_report["confusion"])) == record["dataset"]["splits"]["test"]
    assert test_report["per_class"]["pos"]["support"] == counts["test"]["pos"]
    assert (run_dir / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert record["dataset"]["duplicates"]["test_in_train"] == 0 and record["dataset"]["split_scheme"] == 2


# --- 4. regression baselines -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_regression_reports_a_ridge_probe_and_the_mean_predictor(
    ray_session, tmp_path, tiny_bert_dir, capsys
):
    rows = [{**row, "label": str(len(row["text"].split()))} for row in make_sentiment_rows(120)]
    data = write_csv(tmp_path / "reg.csv", rows)
    config = write_config(
        tmp_path / "c.yaml",
        str(data),
        str(tiny_bert_dir),
        tmp_path,
        train={"epochs": 2, "task": "regression"},
    )
    assert main(["run", str(config), "--no-progress"]) == 0
    out, _ = capsys.readouterr()
    (run_dir,) = (tmp_path / "runs").iterdir()
    m = strict_json((run_dir / "record.json").read_text())["metrics"]
    assert {"probe_val_pearson", "probe_test_pearson", "probe_test_mse", "probe_l2"} <= set(m)
    assert {"mean_val_mse", "mean_test_mse", "mean_prediction"} <= set(m)
    # Word counts are linear-ish in mean-pooled token states: the ridge probe beats the mean.
    assert m["probe_test_mse"] < m["mean_test_mse"]
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("test pearson ") and "(ridge probe pearson " in summary
    assert f"mean predictor mse {m['mean_test_mse']:.4f})" in summary
    assert main(["runs", "ls", "--registry", str(tmp_path / "registry.sqlite")]) == 0
    listing = capsys.readouterr().out.splitlines()[-1]
    assert " pearson " in listing and f"{m['test_pearson']:.4f}" in listing
