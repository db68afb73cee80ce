"""The cache is the hand-off: extract on one machine, then train (and rerun, and sweep) on another that has
neither the dataset source nor the backbone files, from the cache alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Extraction, make_sentiment_rows, write_config, write_csv
from unipt.pipeline import experiment
from unipt.pipeline.cli.app import main
from unipt.pipeline.config import load_config
from unipt.pipeline.experiment.rerun import rerun
from unipt.pipeline.experiment.sweep import sweep
from unipt.pipeline.experiment.trials import Trial
from unipt.pipeline.runs.compare import result_metrics, same_value
from unipt.pipeline.runs.records import referenced_cache_keys
from unipt.pipeline.runs.registry import Registry, registered_cache_keys

pytestmark = pytest.mark.e2e

# The tiny config's training settings, spelled as overrides for a run that has no config file.
TRAIN_SETTINGS = [
    "train.epochs=3",
    "train.batch_size=16",
    "train.lr=0.01",
    "train.block_examples=32",
    "train.probe_baseline=true",
]

# A CLI command in a fresh interpreter that must never import a backbone, transformers or Ray.
NOTHING_HEAVY = """
import sys
from unipt.pipeline.cli.app import main
code = main({argv!r})
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'ray', 'extract'))
print('HEAVY', heavy)
sys.exit(code)
"""


def _same_metrics(a: dict, b: dict) -> None:
    a, b = result_metrics(a), result_metrics(b)
    assert a.keys() == b.keys()
    for key in a:
        assert same_value(a[key], b[key]), (key, a[key], b[key])


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "record.json").read_text())


@pytest.fixture
def cluster_cache(tmp_path, shared_extraction: Extraction):
    """The 'cluster': data, backbone and their cache next to each other (copies of the session's shared
    extraction, since the tests delete them) and one normal run from that cache. Returns (config path,
    normal run's record, the cache's location)."""
    cluster = tmp_path / "cluster"
    backbone = shutil.copytree(shared_extraction.backbone, cluster / "model")
    data = shutil.copy(shared_extraction.data, cluster / "reviews.csv")
    shared_extraction.copy_cache(cluster)
    config = write_config(tmp_path / "cluster.yaml", str(data), str(backbone), cluster, train={"epochs": 3})
    prep = experiment.prepare(load_config(config))
    normal = experiment.run(prep, progress=False)
    assert normal.cache_hit  # the copied cache: the same data and backbone, wherever they are
    return config, _record(normal.run_dir), prep.cache_root.location(prep.key)


def test_train_from_a_copied_cache_alone_matches_the_run_made_next_to_the_data(cluster_cache, tmp_path):
    config, normal, location = cluster_cache
    # A view's activations live in its space's segments beside it: carry the whole cache root.
    root = shutil.copytree(Path(location.url).parent, tmp_path / "gpu" / "carried-root")
    copy = root / Path(location.url).name
    shutil.rmtree(tmp_path / "cluster")  # the data file, the model folder and the original cache: all gone

    runs, registry = tmp_path / "gpu" / "runs", tmp_path / "gpu" / "registry.sqlite"
    argv = ["train", "--cache", str(copy), *[a for s in TRAIN_SETTINGS for a in ("--set", s)]]
    argv += ["--runs-root", str(runs), "--registry", str(registry), "--no-progress"]
    result = subprocess.run(
        [sys.executable, "-c", NOTHING_HEAVY.format(argv=argv)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HEAVY []" in result.stdout  # no backbone, transformers or Ray in the training process
    (run_dir,) = runs.iterdir()
    alone = _record(run_dir)
    _same_metrics(alone["metrics"], normal["metrics"])
    # The cache does not record the data's column names: the model claims none (predict uses the defaults).
    assert json.loads((run_dir / "model.json").read_text())["columns"] == {}
    assert alone["dataset"]["fingerprint"] == normal["dataset"]["fingerprint"]
    assert alone["cache"]["key"] == normal["cache"]["key"]
    assert alone["cache"]["key_fields"] == normal["cache"]["key_fields"]
    assert alone["dataset"]["splits"] == normal["dataset"]["splits"]
    with Registry(registry) as reg:
        (entry,) = reg.list()
    assert entry.cache_key == normal["cache"]["key"]
    assert entry.dataset_fingerprint == normal["dataset"]["fingerprint"]

    # The same with the cluster's config file: its data and backbone are missing, its settings agree.
    code = main(["train", str(config), "--cache", str(copy), "--runs-root", str(runs), "--no-progress"])
    assert code == 0
    with_config = max((_record(d) for d in runs.iterdir()), key=lambda r: r["created_at"] + r["run_id"])
    _same_metrics(with_config["metrics"], normal["metrics"])
    assert with_config["cache"]["key"] == normal["cache"]["key"]

    # A rerun on this machine: only the cache is here; it says so, and reproduces the metrics.
    again = rerun(entry.run_id, str(registry), progress=False)
    assert again.matches and again.is_rerun
    assert _record(again.new.run_dir)["dataset_rechecked"] is False


def test_rerun_says_the_dataset_was_not_rechecked(cluster_cache, tmp_path, capfd):
    config, normal, location = cluster_cache
    (tmp_path / "cluster" / "reviews.csv").unlink()
    registry = str(tmp_path / "cluster" / "registry.sqlite")
    capfd.readouterr()
    again = rerun(normal["run_id"], registry, progress=False)
    assert again.matches and again.new.cache_hit
    err = capfd.readouterr().err
    assert "reviews.csv not found" in err and "the dataset was not re-checked" in err
    assert f"training from cache {normal['cache']['key']} alone" in err


def test_a_config_that_disagrees_with_the_cache_is_refused_naming_the_setting(cluster_cache, capsys):
    config, normal, location = cluster_cache
    for setting, name in (
        ("backbone.layers=[0,2]", "backbone.layers"),
        ("backbone.max_length=16", "backbone.max_length"),
        ("extract.dtype=int8", "extract.dtype"),
    ):
        code = main(["train", str(config), "--cache", location.url, "--set", setting, "--no-progress"])
        _, err = capsys.readouterr()
        assert code == 2 and err.count("\n") == 1, err
        assert f"was built with {name}" in err and f"drop {name}" in err
    # The same refusal without a config: the cache's own settings cannot be overridden.
    code = main(["train", "--cache", location.url, "--set", "backbone.layers=[0,2]", "--no-progress"])
    assert code == 2 and "backbone.layers" in capsys.readouterr().err


def test_other_data_or_another_backbone_is_refused_when_they_are_here(cluster_cache, tmp_path, capsys):
    config, normal, location = cluster_cache
    other = write_csv(tmp_path / "other.csv", make_sentiment_rows(160, seed=7))
    code = main(["train", str(config), "--cache", location.url, "--set", f"dataset.source={other}"])
    assert code == 2 and "built for another dataset" in capsys.readouterr().err
    model = Path(load_config(config).primary_backbone.name_or_path)
    (model / "vocab.txt").write_text((model / "vocab.txt").read_text() + "extra\n")
    code = main(["train", str(config), "--cache", location.url])
    assert code == 2 and "another backbone" in capsys.readouterr().err


def test_the_record_holds_the_key_of_the_cache_read_so_gc_keeps_it(cluster_cache, tmp_path, capsys):
    config, normal, location = cluster_cache
    runs, registry = tmp_path / "r2", tmp_path / "r2.sqlite"
    # A config whose layers are spelt as the list "all" resolved to: a different key, the same bytes.
    code = main(
        ["train", str(config), "--cache", location.url, "--set", "backbone.layers=[0,1,2]",
         "--runs-root", str(runs), "--registry", str(registry), "--no-progress"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (run_dir,) = runs.iterdir()
    assert _record(run_dir)["cache"]["key"] == normal["cache"]["key"] == location.name
    assert referenced_cache_keys(runs) == registered_cache_keys(registry) == {location.name}
    code = main(
        ["cache", "gc", "--cache-root", str(tmp_path / "cluster" / "cache"),
         "--runs-root", str(runs), "--registry", str(registry)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and location.name not in out


def test_sweep_from_a_cache_alone(cluster_cache, tmp_path, ray_session):
    config, normal, location = cluster_cache
    copy = shutil.copytree(Path(location.url).parent, tmp_path / "carried") / Path(location.url).name
    shutil.rmtree(tmp_path / "cluster")
    storage = [f"storage.runs_root={tmp_path / 'sw'}", f"storage.registry={tmp_path / 'sw.sqlite'}"]
    configs = [
        experiment.config_for_cache(str(copy), [*TRAIN_SETTINGS, *storage, f"train.lr={lr}"])
        for lr in (0.01, 0.001)
    ]
    trials = [Trial({"train.lr": c.train.lr}, c) for c in configs]
    result = sweep(configs[0], trials, parallel=2, progress=False, cache=str(copy))
    assert len(result.results) == 2 and result.cache_hit
    by_lr = {r.params["train.lr"]: r for r in result.results}
    _same_metrics(by_lr[0.01].metrics, normal["metrics"])
    with Registry(tmp_path / "sw.sqlite") as reg:
        assert {e.cache_key for e in reg.list()} == {normal["cache"]["key"]}


def test_train_from_a_cache_reuses_the_settings_of_its_last_registered_run(cluster_cache, tmp_path, capfd):
    """`train --cache` without a config trains as the cache's last registered run did (its train.* and
    seed), saying so in one line; with no run registered for the cache it says which defaults it used."""
    _, normal, location = cluster_cache
    registry = tmp_path / "cluster" / "registry.sqlite"
    runs = tmp_path / "from-cache-runs"
    argv = ["train", "--cache", location.url, "--runs-root", str(runs), "--no-progress"]
    capfd.readouterr()
    assert main([*argv, "--registry", str(registry)]) == 0
    err = capfd.readouterr().err
    assert f"train.* and seed from run {normal['run_id']}, the last registered run on this cache" in err
    (run_dir,) = runs.iterdir()
    reused = _record(run_dir)
    assert reused["config"]["train"] == normal["config"]["train"] and reused["seed"] == normal["seed"]
    _same_metrics(reused["metrics"], normal["metrics"])

    # No run of this cache in that registry: the defaults, named, and an override still wins.
    empty = tmp_path / "other" / "registry.sqlite"
    assert main([*argv, "--registry", str(empty), "--set", "train.epochs=1"]) == 0
    err = capfd.readouterr().err
    line = next(x for x in err.splitlines() if "no registered run trained on cache" in x)
    assert "train.* defaults (epochs 1, lr " in line and "--set train.NAME=VALUE" in line
