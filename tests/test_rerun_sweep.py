"""`unipt rerun` reproduces a run exactly (rebuilding a removed cache) or refuses changed data;
`unipt sweep` trains a grid from one cache in parallel Ray tasks, each trial a registered run."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import make_sentiment_rows, write_config, write_csv
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cli.app import main
from unipt.pipeline.runs.compare import result_metrics, same_value
from unipt.pipeline.runs.registry import Registry

FAST = ["--set", "train.epochs=2", "--no-progress"]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _registry(tmp_path) -> str:
    return str(tmp_path / "registry.sqlite")


def _assert_same_metrics(a: dict, b: dict) -> None:
    a, b = result_metrics(a), result_metrics(b)
    assert a.keys() == b.keys()
    for key in a:  # exact float equality: the same bits, not "close"
        assert same_value(a[key], b[key]), (key, a[key], b[key])


@pytest.mark.e2e
def test_rerun_after_gc_rebuilds_the_cache_and_reproduces_metrics_exactly(
    tiny_config, tmp_path, capsys, ray_session
):
    registry = _registry(tmp_path)
    assert _cli(capsys, "run", str(tiny_config), *FAST)[0] == 0
    with Registry(registry) as reg:
        (original,) = reg.list()
    root = CacheRoot(tmp_path / "cache")
    assert root.keys() == [original.cache_key]

    # Collected by a gc that knows none of these runs (another machine's records, say).
    code, out, _ = _cli(
        capsys,
        "cache", "gc", "--yes",
        "--cache-root", str(tmp_path / "cache"),
        "--runs-root", str(tmp_path / "elsewhere"),
        "--registry", str(tmp_path / "other.sqlite"), "--no-registry",
    )  # fmt: skip
    assert code == 0 and f"removing {original.cache_key}" in out and root.keys() == []

    code, out, err = _cli(capsys, "rerun", original.run_id[:20], "--registry", registry, "--no-progress")
    assert code == 0, err
    assert f"cache miss {original.cache_key}" in err  # rebuilt under the same key
    assert f"metrics match run {original.run_id} exactly" in out
    assert root.keys() == [original.cache_key]

    code, out, err = _cli(capsys, "rerun", original.run_id, "--registry", registry, "--no-progress")
    assert code == 0 and "cache hit" in err and "exactly" in out

    with Registry(registry) as reg:
        first, rerun, again = reg.list()
    assert first.run_id == original.run_id
    for entry in (rerun, again):
        assert entry.rerun_of == original.run_id and entry.parent_run_id is None
        assert entry.dataset_fingerprint == original.dataset_fingerprint
        assert entry.cache_key == original.cache_key and entry.config == original.config
        _assert_same_metrics(entry.metrics, original.metrics)
    record = json.loads((tmp_path / "runs" / rerun.run_id / "record.json").read_text())
    assert record["rerun_of"] == original.run_id and record["cache"]["hit"] is False
    assert [h["train_loss"] for h in record["history"]] == [
        h["train_loss"]
        for h in json.loads((tmp_path / "runs" / original.run_id / "record.json").read_text())["history"]
    ]


@pytest.mark.e2e
def test_rerun_refuses_edited_data_and_links_a_new_run_when_allowed(
    tiny_config, tmp_path, capsys, ray_session
):
    registry = _registry(tmp_path)
    assert _cli(capsys, "run", str(tiny_config), *FAST)[0] == 0
    with Registry(registry) as reg:
        (original,) = reg.list()

    rows = make_sentiment_rows(240)  # what the sentiment_csv fixture wrote
    rows[17] = {**rows[17], "text": rows[17]["text"] + " indeed"}  # one edited row
    write_csv(tmp_path / "sentiment.csv", rows)

    code, out, err = _cli(capsys, "rerun", original.run_id, "--registry", registry, "--no-progress")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("unipt: error: dataset ")
    new_fingerprint = err.split(", now ")[1].split(";")[0]
    assert original.dataset_fingerprint in err and len(new_fingerprint) == 64
    assert new_fingerprint != original.dataset_fingerprint
    assert "--allow-new-data" in err
    with Registry(registry) as reg:
        assert len(reg.list()) == 1  # nothing was run or registered

    code, out, err = _cli(
        capsys, "rerun", original.run_id, "--allow-new-data", "--registry", registry, "--no-progress"
    )
    assert code == 0, err
    assert "dataset changed" in err and "cache miss" in err  # new data, new cache key
    with Registry(registry) as reg:
        _, linked = reg.list()
    assert linked.parent_run_id == original.run_id and linked.rerun_of is None
    assert linked.dataset_fingerprint == new_fingerprint
    assert linked.cache_key != original.cache_key
    assert linked.config == original.config
    record = json.loads((tmp_path / "runs" / linked.run_id / "record.json").read_text())
    assert record["data_changed"] == {
        "old_fingerprint": original.dataset_fingerprint,
        "new_fingerprint": new_fingerprint,
    }
    code, out, _ = _cli(capsys, "runs", "ls", "--registry", registry)
    assert f"new data, from {original.run_id}" in out


@pytest.mark.e2e
def test_sweep_trains_a_grid_from_one_cache_in_parallel(tiny_config, tmp_path, capsys, ray_session):
    registry = _registry(tmp_path)
    code, out, err = _cli(
        capsys,
        "sweep", str(tiny_config), *FAST,
        "--grid", "train.lr=1e-2,3e-3",
        "--grid", "train.dropout=0.0,0.3",
        "--parallel", "2",
    )  # fmt: skip
    assert code == 0, err
    assert err.count("cache miss") == 1 and "4 trials" in err and "2 at a time, 1 CPU(s) each" in err
    assert len(CacheRoot(tmp_path / "cache").keys()) == 1  # one extraction for every trial

    table = out.splitlines()
    assert table[0].split() == [
        "rank",
        "run_id",
        "train.lr",
        "train.dropout",
        "val_acc",
        "test_acc",
        "best_epoch",
        "cpus",
        "gpus",
        "status",
    ]
    body = [line.split() for line in table[1:5]]
    assert all(row[-3:] == ["1", "0", "finished"] for row in body)  # no GPUs here: none asked for
    assert [row[0] for row in body] == ["1", "2", "3", "4"]
    val = [float(row[4]) for row in body]
    assert val == sorted(val, reverse=True)
    assert {(row[2], row[3]) for row in body} == {
        ("0.01", "0.0"),
        ("0.01", "0.3"),
        ("0.003", "0.0"),
        ("0.003", "0.3"),
    }
    sweep_id = table[5].split(":")[0]
    assert sweep_id.startswith("sweep-")

    with Registry(registry) as reg:
        trials = reg.list(sweep_id=sweep_id)
    assert len(trials) == 4 and len({t.cache_key for t in trials}) == 1
    assert {t.run_id for t in trials} == {row[1] for row in body}
    for trial in trials:
        assert trial.config["train"]["lr"] == trial.sweep_params["train.lr"]
        assert trial.config["train"]["dropout"] == trial.sweep_params["train.dropout"]
        assert trial.config["train"]["epochs"] == 2 and trial.runtime["torch_threads"] == 1
    by_id = {t.run_id: t for t in trials}
    assert [round(by_id[row[1]].metrics["val_acc"], 4) for row in body] == val

    code, out, _ = _cli(capsys, "runs", "ls", "--sweep", sweep_id, "--registry", registry)
    assert len(out.splitlines()) == 5

    # A trial trained in a Ray worker reruns in this process to the same numbers.
    best = by_id[body[0][1]]
    code, out, err = _cli(capsys, "rerun", best.run_id, "--registry", registry, "--no-progress")
    assert code == 0 and "exactly" in out, out + err


def test_sweep_only_varies_training_settings(tiny_config, capsys):
    cases = [
        (["--grid", "backbone.max_length=16,32"], "only train.* settings can be swept"),
        (["--grid", "train.learning_rate=1,2"], "no such training setting"),
        (["--grid", "train.lr"], "is not KEY=V1,V2"),
        (["--grid", "train.lr=1e-3", "--grid", "train.lr=1e-4"], "given twice"),
        (["--grid", "train.lr=1e-3,,1e-4"], "empty value"),
        (["--grid", "train.lr=1e-3", "--parallel", "0"], "--parallel 0"),
    ]
    for extra, message in cases:
        code, out, err = _cli(capsys, "sweep", str(tiny_config), *extra)
        assert code == 2 and err.count("\n") == 1 and message in err, (extra, err)


@pytest.mark.e2e
def test_rerun_refuses_a_changed_backbone_naming_the_changed_key_field(
    tmp_path, tiny_bert_dir, sentiment_csv, capsys, ray_session
):
    backbone = tmp_path / "bert"
    shutil.copytree(tiny_bert_dir, backbone)
    config = write_config(tmp_path / "c.yaml", str(sentiment_csv), str(backbone), tmp_path)
    registry = _registry(tmp_path)
    assert _cli(capsys, "run", str(config), *FAST)[0] == 0
    with Registry(registry) as reg:
        (original,) = reg.list()

    weights = next(backbone.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the same path, other weights
    weights.write_bytes(bytes(data))
    code, _, err = _cli(capsys, "rerun", original.run_id, "--registry", registry, "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert original.cache_key in err and "backbone.weights_sha256" in err and "--allow-new-data" in err


def _sorted_by_headline(out: str, headline: str) -> list[list[str]]:
    """The sweep table's rows, checked to be sorted by the task's validation headline metric."""
    lines = out.splitlines()
    header = lines[0].split()
    at = header.index(f"val_{headline}")
    assert header[at : at + 3] == [f"val_{headline}", f"test_{headline}", "best_epoch"], header
    body = [line.split() for line in lines[1:] if line.split() and line.split()[0].isdigit()]
    scores = [float(row[header.index(f"val_{headline}")]) for row in body]
    assert scores == sorted(scores, reverse=True), scores
    return body


@pytest.mark.e2e
def test_a_regression_sweep_sorts_by_validation_pearson(tmp_path, tiny_bert_dir, capsys, ray_session):
    from tests.conftest import make_score_rows

    data = write_csv(tmp_path / "scores.csv", make_score_rows(160))
    config = write_config(
        tmp_path / "reg.yaml",
        str(data),
        str(tiny_bert_dir),
        tmp_path,
        train={"task": "regression", "epochs": 2},
        dataset={"label_column": "score"},
    )
    code, out, err = _cli(
        capsys, "sweep", str(config), "--no-progress", "--grid", "train.lr=1e-2,1e-3", "--parallel", "2"
    )
    assert code == 0, err
    body = _sorted_by_headline(out, "pearson")
    assert len(body) == 2
    code, out, _ = _cli(capsys, "runs", "ls", "--registry", _registry(tmp_path))
    assert code == 0 and all(" pearson " in line for line in out.splitlines()[1:3]), out


@pytest.mark.e2e
def test_a_retrieval_sweep_sorts_by_validation_rsum(
    tmp_path, tiny_vit_dir, tiny_bert_dir, capsys, ray_session
):
    import yaml

    from tests.test_multi_backbone import pairs_config

    path = pairs_config(tmp_path, tiny_vit_dir, tiny_bert_dir)
    config = yaml.safe_load(path.read_text())
    config["train"].update(task="retrieval", epochs=2, batch_size=8, probe_baseline=False)
    path.write_text(yaml.safe_dump(config))
    code, out, err = _cli(capsys, "sweep", str(path), "--no-progress", "--grid", "train.lr=1e-2,1e-3")
    assert code == 0, err
    assert len(_sorted_by_headline(out, "rsum")) == 2
