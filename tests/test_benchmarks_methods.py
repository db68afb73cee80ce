"""benchmarks/methods.py at toy size: one shared cache per dataset, every run in its own process, the report.

No timing or accuracy is asserted (a tiny random BERT learns nothing): only that each dataset is extracted
once, every (method, seed) and full fine-tuning is measured and the table, goal and files are written.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import methods
from benchmarks import methods_tuned as tuned
from tests.conftest import make_sentiment_rows, write_config, write_csv
from unipt.pipeline.config import TrainConfig, parse_override


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


# --- the tuned comparison (benchmarks/methods_tuned.py, issue 32) -----------------------------------------


@pytest.mark.parametrize("quick", [False, True])
def test_every_method_searches_the_same_settings_and_its_own_width(quick):
    shared = {"train.lr", "train.weight_decay", "train.epochs"}
    spaces = {m: tuned.search_space(m, quick) for m in tuned.METHODS}
    assert set(spaces["linear_probe"]) == shared  # a linear layer: no dropout, no width
    assert set(spaces["scalar_mix"]) == shared | {"train.dropout"}
    assert set(spaces["lst"]) == shared | {"train.dropout", "train.side_reduction"}
    assert set(spaces["unipt"]) == shared | {"train.dropout", "train.embed_size"}
    for space in spaces.values():
        assert space["train.lr"].kind == "loguniform"
        for key, dist in space.items():
            # Every value the space can draw is a valid train setting (a choice's each, a range's ends).
            for value in dist.args:
                TrainConfig.model_validate({key.removeprefix("train."): value})
    # One optimiser space for every method: the same draws, so no method gets a wider search.
    assert len({repr({k: spaces[m][k] for k in shared}) for m in spaces}) == 1
    assert tuned.max_epochs(spaces["unipt"]) == max(spaces["unipt"]["train.epochs"].args)
    with pytest.raises(methods.UniptError, match="no search space for method 'probe'"):
        tuned.search_space("probe")


@pytest.mark.parametrize("value", [1e-05, 0.00031622776601683794, 3e-3, 2.5e-07, 384, 0.0])
def test_best_settings_become_overrides_that_read_back_exactly(value):
    (override,) = tuned.overrides_for({"train.lr": value})
    path, parsed = parse_override(override)
    assert path == ["train", "lr"] and parsed == value and type(parsed) is type(value)


def _row(method: str, mean: float, std: float, seeds: int = 3) -> dict:
    return {"dataset": "d", "method": method, "metric": "acc", "test_mean": mean, "test_std": std,
            "seeds": seeds}  # fmt: skip


def test_verdict_says_beyond_the_seed_spread_and_the_points_to_full_finetuning():
    above = tuned.verdict(
        [_row("lst", 0.79, 0.004), _row("unipt", 0.80, 0.004), _row("full_finetune", 0.805, 0.002)]
    )
    assert above["d"]["unipt_vs_lst"] == "above" and above["d"]["goal_met"] is True
    assert above["d"]["points_from_full_finetune"] == pytest.approx(-0.5)
    assert above["d"]["text"] == (
        "d (acc): UniPT 0.8000 ± 0.0040 beats LST 0.7900 ± 0.0040 beyond the seed spread; 0.5 points below "
        "full fine-tuning 0.8050 ± 0.0020: goal met"
    )
    # Means apart, spreads overlapping: level, and so the goal is missed however close to fine-tuning.
    level = tuned.verdict(
        [_row("lst", 0.79, 0.006), _row("unipt", 0.80, 0.006), _row("full_finetune", 0.80, 0.0)]
    )
    assert level["d"]["unipt_vs_lst"] == "level" and level["d"]["goal_met"] is False
    assert "is level with LST 0.7900 ± 0.0060 within the seed spread; 0.0 points above" in level["d"]["text"]
    assert level["d"]["text"].endswith("goal missed (above LST and within 1 point)")
    far = tuned.verdict(
        [_row("lst", 0.70, 0.001), _row("unipt", 0.75, 0.001), _row("full_finetune", 0.77, 0.001)]
    )
    assert far["d"]["goal_met"] is False and far["d"]["points_from_full_finetune"] == pytest.approx(-2.0)
    below = tuned.verdict([_row("lst", 0.80, 0.001), _row("unipt", 0.75, 0.001)])
    assert below["d"]["unipt_vs_lst"] == "below" and below["d"]["goal_met"] is None  # no fine-tuning row
    assert "is below LST" in below["d"]["text"] and "full fine-tuning" not in below["d"]["text"]
    one_seed = tuned.verdict([_row("lst", 0.79, 0.0, seeds=1), _row("unipt", 0.80, 0.0, seeds=1)])
    assert "(one seed: no spread measured)" in one_seed["d"]["text"]
    assert tuned.verdict([_row("lst", 0.79, 0.0)]) == {}  # no UniPT row: nothing to judge


def test_merge_rows_carry_the_best_settings_and_gpu_memory():
    runs = [
        {"dataset": "d", "method": "unipt", "seed": s, "metric": "acc", "test": t, "val": t, "epochs": 2,
         "trainable_params": 7, "peak_rss_mib": 900.0 + s, "peak_gpu_mib": gpu, "seconds_per_epoch": 1.0,
         "examples": 10, "params": {"train.lr": 0.01}}
        for s, t, gpu in [(0, 0.6, 100.0), (1, 0.8, 300.0), (2, 0.7, 200.0)]
    ]  # fmt: skip
    (row,) = tuned.rows_of(runs)
    assert row["test_mean"] == pytest.approx(0.7) and row["test_std"] == pytest.approx(0.1)
    assert (
        row["peak_gpu_mib"] == 200.0
        and row["peak_rss_mib"] == 901.0
        and row["best_params"] == {"train.lr": 0.01}
    )
    for run in runs:
        run["peak_gpu_mib"] = None  # trained on the CPU
    assert tuned.rows_of(runs)[0]["peak_gpu_mib"] is None


@pytest.mark.e2e
def test_tuned_study_resumes_and_writes_the_table_figure_and_verdict(toy_configs, tmp_path, ray_session):
    out = tmp_path / "results" / "methods_tuned.json"
    argv = ["--quick", "--datasets", "toy_cls", "--methods", "lst", "unipt", "--seeds", "0", "1"]
    argv += ["--cache-root", str(tmp_path / "cache"), "--out", str(out)]

    # A budget spent by the first step stops the study after its first sweep, as a kill would.
    tuned.drive(tuned.parse([*argv, "--budget-hours", "1e-9"]))
    first = json.loads(out.read_text())
    assert list(first["sweeps"]) == ["toy_cls/lst"] and first["runs"] == []
    lst_sweep = first["sweeps"]["toy_cls/lst"]
    assert lst_sweep["trials"] == tuned.QUICK_TRIALS == first["budget"]["trials_per_method"]

    report = tuned.drive(tuned.parse(argv))  # the same command again: it goes on
    assert report["sweeps"]["toy_cls/lst"] == lst_sweep  # not run again
    sweeps = sorted(p.name for p in (tmp_path / "runs" / "sweeps").iterdir())
    assert sweeps == sorted(s["sweep_id"] for s in report["sweeps"].values())  # two sweeps in all
    cache_key = report["datasets"]["toy_cls"]["cache_key"]
    for method, sweep in ((m, report["sweeps"][f"toy_cls/{m}"]) for m in ("lst", "unipt")):
        assert sweep["trials"] == 2 and sweep["finished"] >= 1 and sweep["cache_keys"] == [cache_key]
        assert set(sweep["best_params"]) == set(tuned.search_space(method, quick=True))
    runs = {(r["method"], r["seed"]): r for r in report["runs"]}
    assert set(runs) == {(m, s) for m in ("lst", "unipt", "full_finetune") for s in (0, 1)}
    for method in ("lst", "unipt"):
        best = report["sweeps"][f"toy_cls/{method}"]["best_params"]
        assert all(runs[(method, s)]["params"] == best for s in (0, 1))
        assert runs[(method, 0)]["epochs"] == best["train.epochs"]  # trained at the sweep's best settings
    search = report["finetune_search"]["toy_cls"]
    assert sorted(float(lr) for lr in search) == sorted(tuned.QUICK_FINETUNE_LRS)
    best_lr = max(search.values(), key=lambda r: r["val"])["params"]["finetune_lr"]
    assert runs[("full_finetune", 0)] == search[tuned.yaml_number(best_lr)]  # the search's own run
    assert runs[("full_finetune", 1)]["params"] == {"finetune_lr": best_lr}
    assert report["budget"]["finetune_lr_trials"] == 2 and report["budget"]["seed_runs"] == 6

    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"lst", "unipt", "full_finetune"} and all(r["seeds"] == 2 for r in rows.values())
    assert rows["unipt"]["trainable_params"] < rows["full_finetune"]["trainable_params"]
    assert report["verdict"]["toy_cls"]["text"].startswith("toy_cls (acc): UniPT ")
    assert out.with_suffix(".csv").read_text().splitlines()[0] == ",".join(tuned.COLUMNS)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Other settings would mix two studies in one report: refused, the report left as it was.
    before = out.read_text()
    with pytest.raises(methods.UniptError, match="other settings \\(trials_per_method differ\\)"):
        tuned.drive(tuned.parse([*argv, "--trials", "3"]))
    assert out.read_text() == before


def test_a_state_with_settings_outside_the_space_is_refused(tmp_path):
    args = tuned.parse(["--quick", "--methods", "unipt", "--out", str(tmp_path / "t.json")])
    settings = tuned._settings(args)
    state = {"benchmark": "methods_tuned", "settings": settings,
             "sweeps": {"d/unipt": {"best_params": {"storage.cache_root": "/elsewhere"}}}}  # fmt: skip
    (tmp_path / "t.json").write_text(json.dumps(state))
    with pytest.raises(methods.UniptError, match="sweep d/unipt has best settings outside its search space"):
        tuned.load_state(tmp_path / "t.json", settings)
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(methods.UniptError, match="not a readable report"):
        tuned.load_state(tmp_path / "t.json", settings)
    with pytest.raises(methods.UniptError, match="no report at .* yet; run the study first"):
        tuned.drive(tuned.parse(["--report", "--out", str(tmp_path / "none.json")]))
    assert not (tmp_path / "none.json").exists()


def test_figure_plots_each_dataset_against_parameters_and_memory(tmp_path):
    rows = [
        {**_row(m, mean, std), "dataset": d, "trainable_params": p, "peak_rss_mib": rss, "peak_gpu_mib": None}
        for d in ("d1", "d2")
        for m, mean, std, p, rss in [("lst", 0.79, 0.01, 318_680, 1595.0),
                                     ("unipt", 0.80, 0.02, 632_643, 1394.0),
                                     ("full_finetune", 0.83, 0.005, 22_713_986, 3137.0)]
    ]  # fmt: skip
    report = {
        "date": "2026-12-07",
        "machine": {"cpus": 2},
        "settings": {"trials_per_method": 6},
        "rows": rows,
    }
    out = tuned.plot(report, tmp_path / "f.png")
    from PIL import Image

    with Image.open(out) as image:  # two panels per dataset, one row each: taller than wide for 2 datasets
        width, height = image.size
    assert image.format == "PNG" and height > 0.6 * width
    with pytest.raises(methods.UniptError, match="no rows to plot yet"):
        tuned.plot({"rows": []}, tmp_path / "g.png")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--trials", "0"], "--trials 0: give a positive number"),
        (["--quick", "--finetune-epochs", "0"], "--finetune-epochs 0: give a positive number"),
        (["--budget-hours", "-1"], "--budget-hours -1: give a positive number"),
        (["--finetune-lrs", "1e-4", "0"], "--finetune-lrs 0.0001 0.0: give positive rates"),
        (["--seeds", "0", "0"], "--seeds 0 0: give each seed once"),
    ],
)
def test_bad_options_are_refused_before_anything_runs(argv, message, capsys):
    # A zero must not fall back to a default: --trials 0 once started the full study.
    assert tuned.main(argv) == 2
    assert capsys.readouterr().err == f"methods_tuned: error: {message}\n"
