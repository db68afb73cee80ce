"""benchmarks/methods.py at toy size: one shared cache per dataset, every run in its own process, the report.

No timing or accuracy is asserted (a tiny random BERT learns nothing): only that each dataset is extracted
once, every (method, seed) and full fine-tuning is measured and the table, goal and files are written.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import methods
from tests.conftest import make_sentiment_rows, write_config, write_csv


@pytest.fixture
def toy_configs(tmp_path, tiny_bert_dir, monkeypatch):
    rows = make_sentiment_rows(120)
    scores = [dict(r, label=str(0.9 if r["label"] == "pos" else 0.2)) for r in rows]
    small = {"epochs": 1, "batch_size": 16, "block_examples": 32, "side_reduction": 4, "embed_size": 16}
    configs = {
        "toy_cls": write_config(
            tmp_path / "cls.yaml", str(write_csv(tmp_path / "cls.csv", rows)), str(tiny_bert_dir), tmp_path,
            train=small,
        ),
        "toy_reg": write_config(
            tmp_path / "reg.yaml", str(write_csv(tmp_path / "reg.csv", scores)), str(tiny_bert_dir), tmp_path,
            train=small | {"task": "regression"},
        ),
    }  # fmt: skip
    monkeypatch.setattr(methods, "CONFIGS", configs)
    return configs


@pytest.mark.e2e
def test_methods_report(toy_configs, tmp_path, ray_session):
    out = tmp_path / "results" / "methods.json"
    argv = ["--datasets", "toy_cls", "toy_reg", "--methods", "scalar_mix", "unipt", "--seeds", "0"]
    argv += ["--cache-root", str(tmp_path / "cache"), "--out", str(out)]
    methods.drive(methods.build_parser().parse_args(argv))

    report = json.loads(out.read_text())
    assert set(report["datasets"]) == {"toy_cls", "toy_reg"}
    assert (
        report["datasets"]["toy_cls"]["task"] == "classification"
        and "load_average_1m_now" in report["machine"]
    )
    runs = {(r["dataset"], r["method"], r["seed"]): r for r in report["runs"]}
    # Each method per dataset, full fine-tuning once (seed 0) per dataset, regression included.
    expected = {(d, m, 0) for d in ("toy_cls", "toy_reg") for m in ("scalar_mix", "unipt", "full_finetune")}
    assert set(runs) == expected
    for run in runs.values():
        assert run["peak_rss_mib"] > 100 and run["seconds_per_epoch"] > 0 and run["epochs"] == 1
        assert run["metric"] == ("acc" if run["dataset"] == "toy_cls" else "pearson")
    for dataset in ("toy_cls", "toy_reg"):
        params = {
            m: runs[(dataset, m, 0)]["trainable_params"] for m in ("scalar_mix", "unipt", "full_finetune")
        }
        assert params["scalar_mix"] != params["unipt"] < params["full_finetune"]  # each trained its method
    # The regression fine-tuning has one output where classification's has two classes: 32 weights + 1 less.
    cls_ft, reg_ft = (runs[(d, "full_finetune", 0)]["trainable_params"] for d in ("toy_cls", "toy_reg"))
    assert cls_ft - reg_ft == 33

    rows = {(r["dataset"], r["method"]): r for r in report["rows"]}
    assert set(rows) == {k[:2] for k in runs}
    assert rows[("toy_cls", "unipt")]["test_mean"] == runs[("toy_cls", "unipt", 0)]["test"]
    assert isinstance(report["goal"]["toy_cls"]["above_scalar_mix"], bool)
    assert report["goal"]["toy_cls"]["above_lst"] is None  # not run
    assert isinstance(report["goal"]["toy_cls"]["within_1pt_of_full_finetune"], bool)
    assert isinstance(report["goal"]["toy_reg"]["within_1pt_of_full_finetune"], bool)  # Pearson against it
    assert out.with_suffix(".csv").read_text().splitlines()[0] == ",".join(methods.COLUMNS)


def test_goal_is_judged_on_means():
    def row(method: str, mean: float) -> dict:
        return {"dataset": "d", "method": method, "test_mean": mean}

    rows = [row("scalar_mix", 0.80), row("lst", 0.79), row("unipt", 0.805), row("full_finetune", 0.816)]
    verdict = methods.goal(rows)["d"]
    assert verdict["above_scalar_mix"] and verdict["above_lst"]
    assert not verdict["within_1pt_of_full_finetune"] and verdict[
        "unipt_minus_full_finetune"
    ] == pytest.approx(-0.011)
    assert methods.goal(rows[:3])["d"]["within_1pt_of_full_finetune"] is None


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = [
        {"metric": "acc", "test": t, "val": 0.5, "trainable_params": 10, "peak_rss_mib": rss,
         "seconds_per_epoch": sec, "epochs": 3, "examples": 100}
        for t, rss, sec in [(0.7, 900.0, 2.0), (0.8, 1000.0, 9.0), (0.9, 950.0, 3.0)]
    ]  # fmt: skip
    row = methods.summarise("d", "unipt", runs)
    assert row["test_mean"] == pytest.approx(0.8) and row["test_std"] == pytest.approx(0.1)
    assert row["seeds"] == 3 and row["peak_rss_mib"] == 950.0 and row["seconds_per_epoch"] == 3.0  # medians


def _report(path, dataset: str, runs: list[tuple[str, int, float]]) -> None:
    """A methods report of hand-made runs (what `drive` writes), for the merge."""
    path.write_text(json.dumps({
        "datasets": {dataset: {"task": "classification", "examples": 10}},
        "runs": [
            {"dataset": dataset, "method": m, "seed": s, "metric": "acc", "test": t, "val": t,
             "trainable_params": 5, "peak_rss_mib": 900.0, "seconds_per_epoch": 2.0, "epochs": 1,
             "examples": 10}
            for m, s, t in runs
        ],
    }))  # fmt: skip


def test_merge_combines_reports_and_refuses_a_run_twice(tmp_path):
    _report(tmp_path / "a.json", "d1", [("unipt", 0, 0.8), ("unipt", 1, 0.6), ("lst", 0, 0.7)])
    _report(tmp_path / "b.json", "d2", [("unipt", 0, 0.5)])
    out = tmp_path / "merged.json"
    argv = ["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)]
    methods.drive(methods.build_parser().parse_args(argv))
    report = json.loads(out.read_text())
    assert set(report["datasets"]) == {"d1", "d2"} and len(report["runs"]) == 4
    rows = {(r["dataset"], r["method"]): r for r in report["rows"]}
    assert rows[("d1", "unipt")]["seeds"] == 2 and rows[("d1", "unipt")]["test_mean"] == pytest.approx(0.7)
    assert report["goal"]["d1"]["above_lst"] is False  # 0.7 is not above 0.7

    # The same run in two reports would count one seed twice: refused, and --out is left as it was.
    argv = ["--merge", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--out", str(tmp_path / "x.json")]
    with pytest.raises(methods.UniptError, match="d1 unipt seed 0"):
        methods.drive(methods.build_parser().parse_args(argv))
    assert not (tmp_path / "x.json").exists()
