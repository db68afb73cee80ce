"""`unipt sweep` on Ray Tune: each trial asks for its share of the cluster's CPUs and GPUs (tested with
Ray's logical resources: ``ray.init(num_gpus=1)`` on a machine without one), ASHA stops trailing trials
from the epoch hook's validation scores, a failed trial is recorded as failed while the others finish,
sampled settings (random or Optuna), and an interrupted sweep continues with ``--resume``."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unipt.pipeline.cli.app import main
from unipt.pipeline.runs.registry import Registry

pytestmark = pytest.mark.e2e

FAST = ["--set", "train.epochs=3", "--no-progress"]


@pytest.fixture(scope="module")
def one_gpu_ray():
    """A local Ray that believes it has one GPU (logical resources: nothing runs on it here)."""
    import ray

    was_running = ray.is_initialized()
    ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
    if was_running:  # hand the session-wide local Ray back as the other tests expect it
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")


def _extracted_without_gpus(config: Path) -> None:
    """The trials' cache, extracted by a Ray without GPUs: with this CPU torch, an extraction actor that
    Ray gives a (logical) GPU refuses to run (see the test below), so the sweep must find its cache."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        assert main(["extract", str(config), "--no-progress"]) == 0
    finally:
        ray.shutdown()
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use the GPU Ray gives")
def test_an_extraction_actor_given_a_gpu_torch_cannot_use_fails_in_one_line(tiny_config, capsys, one_gpu_ray):
    assert main(["extract", str(tiny_config), "--no-progress"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unipt: error:")]
    assert len(lines) == 1
    assert "Ray gave this extraction worker GPU 0 but torch cannot use it: torch " in lines[0]
    assert "is a CPU-only build (torch.version.cuda is None)" in lines[0]


def _sweep(capsys, *args: str) -> tuple[int, list[list[str]], str, str]:
    code = main(["sweep", *args])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    table = [
        line.split()
        for line in lines
        if line.split() and (line.startswith("rank") or line.split()[0].isdigit())
    ]
    return code, table, out, err


def _trials(tmp_path: Path, sweep_id: str) -> list:
    with Registry(str(tmp_path / "registry.sqlite")) as registry:
        return registry.list(sweep_id=sweep_id)


def test_each_trial_asks_for_an_even_gpu_share_and_a_failed_trial_does_not_stop_the_others(
    tiny_config, tmp_path, capsys, one_gpu_ray
):
    _extracted_without_gpus(tiny_config)
    code, table, out, err = _sweep(
        capsys, str(tiny_config), *FAST, "--grid", "train.lr=1e-2,3e-3",
        "--grid", "train.variant=transformer,cnn", "--parallel", "2",
    )  # fmt: skip
    assert code == 0, err
    assert "4 trials" in err and "2 at a time, 1 CPU(s) each, 0.5 GPU each" in err
    header, body = table[0], table[1:]
    assert header == [
        "rank", "run_id", "train.lr", "train.variant", "val_acc", "test_acc", "best_epoch",
        "cpus", "gpus", "status",
    ]  # fmt: skip
    assert [row[-3:] for row in body[:2]] == [["1", "0.5", "finished"]] * 2
    assert [row[-1] for row in body[2:]] == ["failed", "failed"] and {row[3] for row in body[2:]} == {"cnn"}
    assert out.count("failed: train.variant 'cnn' needs CNN feature maps") == 2  # the cause, one line each
    val = [float(row[4]) for row in body[:2]]
    assert val == sorted(val, reverse=True)

    sweep_id = out.strip().splitlines()[-1].split(":")[0]
    runs = _trials(tmp_path, sweep_id)
    assert {r.run_id for r in runs} == {row[1] for row in body[:2]}  # every finished trial is a run
    for run in runs:
        # What the trial asked Ray for, and the device it actually trained on.
        assert run.runtime["ray_resources"] == {"CPU": 1.0, "GPU": 0.5}
        if torch.cuda.is_available():
            assert run.runtime["device"] == "cuda" and run.runtime["device_reason"].startswith("cuda (")
        else:  # Ray gave it a GPU share this CPU torch cannot use: the record says so, and why
            assert run.runtime["device"] == "cpu"
            assert run.runtime["device_reason"].startswith("cpu (no GPU visible: Ray gave this trial 0.5 GPU")
            assert "CPU-only build" in run.runtime["device_reason"]
        assert run.runtime["torch_threads"] == 1


def test_asha_stops_a_trailing_trial_from_its_epoch_scores(tiny_config, tmp_path, capsys, one_gpu_ray):
    _extracted_without_gpus(tiny_config)
    code, table, out, err = _sweep(
        capsys, str(tiny_config), *FAST, "--grid", "train.lr=3e-2,1e-7", "--parallel", "1",
        "--gpus-per-trial", "0.25", "--early-stop", "asha",
    )  # fmt: skip
    assert code == 0, err
    assert "1 at a time, 2 CPU(s) each, 0.25 GPU each" in err
    (best, slow) = table[1:]
    assert best[2] == "0.03" and best[-1] == "finished" and best[-2] == "0.25"
    assert slow[2] == "1e-07" and slow[-1] in ("stopped@1", "stopped@2") and slow[1] == "-"
    sweep_id = out.strip().splitlines()[-1].split(":")[0]
    assert [r.run_id for r in _trials(tmp_path, sweep_id)] == [best[1]]  # a stopped trial is no run
    # Between trial ends, a line at every epoch a trial reports: done / running / pending, best so far.
    progress = [line for line in err.splitlines() if line.startswith("unipt: sweep: ")]
    assert progress[0].startswith(
        "unipt: sweep: 0 of 2 trials done, 1 running, 1 pending; best so far val_acc"
    )
    done = [int(line.split()[2]) for line in progress]
    assert done == sorted(done) and len(progress) >= 3
    last = progress[-1]
    assert last.startswith("unipt: sweep: 2 of 2 trials done, 0 running, 0 pending; best so far val_acc ")
    assert float(last.split("val_acc ")[1].split()[0]) >= float(best[3]) - 1e-4  # the winner's val_acc
    assert (
        main(["sweep", str(tiny_config), "--grid", "train.lr=1e-3", "--gpus-per-trial", "2", "--no-progress"])
        == 2
    )
    assert "--gpus-per-trial 2 but the Ray cluster has 1 GPU(s)" in capsys.readouterr().err


def test_a_trial_with_no_gpu_share_trains_on_the_cpu(tiny_config, tmp_path, capsys, one_gpu_ray):
    # Ray no longer hides the GPUs from a trial asking for none: without train.device=cpu it would
    # land on cuda:0 (where there is one) beside the trials holding its shares.
    _extracted_without_gpus(tiny_config)
    code, table, out, err = _sweep(
        capsys, str(tiny_config), "--set", "train.epochs=1", "--no-progress", "--grid", "train.lr=1e-2",
        "--gpus-per-trial", "0",
    )  # fmt: skip
    assert code == 0, err
    sweep_id = out.strip().splitlines()[-1].split(":")[0]
    (run,) = _trials(tmp_path, sweep_id)
    assert run.runtime["device"] == "cpu" and run.runtime["device_reason"] == "cpu (train.device: cpu)"
    assert run.runtime["ray_resources"].get("GPU", 0) == 0


def test_sampled_settings_with_optuna(tiny_config, tmp_path, capsys, one_gpu_ray):
    _extracted_without_gpus(tiny_config)
    code, table, out, err = _sweep(
        capsys, str(tiny_config), *FAST, "--sample", "train.lr=loguniform:1e-3:1e-1",
        "--sample", "train.dropout=choice:0.0:0.3", "--samples", "2", "--search", "optuna", "--parallel", "2",
    )  # fmt: skip
    assert code == 0, err
    assert table[0][2:4] == ["train.lr", "train.dropout"] and len(table) == 3
    for row in table[1:]:
        assert 1e-3 <= float(row[2]) <= 1e-1 and row[3] in ("0.0", "0.3") and row[-1] == "finished"


def _registered(registry: Path) -> int:
    if not registry.exists():
        return 0
    try:
        with sqlite3.connect(registry) as db:
            return db.execute("select count(*) from runs").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_an_interrupted_sweep_continues_with_resume(tiny_config, tmp_path, capsys, one_gpu_ray):
    _extracted_without_gpus(tiny_config)
    registry = tmp_path / "registry.sqlite"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "unipt.pipeline.cli", "sweep", str(tiny_config), *FAST, "--parallel", "1",
         "--sample", "train.lr=loguniform:1e-3:1e-2", "--samples", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 400
    while _registered(registry) < 1 and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sweep.poll() is None, sweep.communicate()
    sweep.send_signal(signal.SIGINT)  # Ctrl-C, one trial in
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 2 and "unipt sweep --resume sweep-" in err, err[-3000:]
    sweep_id = err.split("unipt sweep --resume ")[1].split("`")[0]
    first = _trials(tmp_path, sweep_id)
    assert 1 <= len(first) < 3

    where = ["--runs-root", str(tmp_path / "runs"), "--registry", str(registry)]
    code, table, out, err = _sweep(capsys, "--resume", sweep_id, *where, "--no-progress")
    assert code == 0, err
    runs = _trials(tmp_path, sweep_id)
    assert len(runs) == 3 and len({r.run_id for r in runs}) == 3  # finished trials kept, none twice
    assert {r.run_id for r in first} <= {r.run_id for r in runs}
    assert sorted(row[1] for row in table[1:]) == sorted(r.run_id for r in runs)
    spec = json.loads((tmp_path / "runs" / "sweeps" / sweep_id / "sweep.json").read_text())
    assert spec["samples"] == 3 and "train.lr" in spec["distributions"]


class _RunsCode:
    """Unpickling this runs a shell command: what a replaced tuner.pkl would hold."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.sentinel}",))


def test_a_killed_sweep_resumes_without_running_registered_trials_or_unpickling(
    tiny_config, tmp_path, capsys, one_gpu_ray
):
    """kill -9 once the first trial is registered, a hostile tuner.pkl in the sweep's folder, then
    --resume: the registered trial is kept (3 runs for 3 trials), nothing is unpickled, and each trial's
    line shows its selected epoch's score, as the table does."""
    import os
    import pickle

    registry = tmp_path / "registry.sqlite"
    grid = ["--grid", "train.lr=1e-3,3e-3,1e-2"]
    sweep = subprocess.Popen(
        [sys.executable, "-m", "unipt.pipeline.cli", "sweep", str(tiny_config), *FAST,
         "--parallel", "1", *grid],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 400
    while _registered(registry) < 1 and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sweep.poll() is None, "the sweep ended before it could be killed"
    os.killpg(sweep.pid, signal.SIGKILL)  # the driver and the Ray it started, no cleanup
    sweep.wait(timeout=60)
    with Registry(str(registry)) as runs:
        first = runs.list()
    sweep_id = first[0].sweep_id
    assert sweep_id and 1 <= len(first) < 3
    sentinel = tmp_path / "unpickled"
    for pkl in (tmp_path / "runs" / "sweeps" / sweep_id).rglob("*.pkl"):
        pkl.write_bytes(pickle.dumps(_RunsCode(sentinel)))
    (tmp_path / "runs" / "sweeps" / sweep_id / "tuner.pkl").write_bytes(pickle.dumps(_RunsCode(sentinel)))

    where = ["--runs-root", str(tmp_path / "runs"), "--registry", str(registry)]
    code, table, out, err = _sweep(capsys, "--resume", sweep_id, *where, "--no-progress")
    assert code == 0, err
    assert not sentinel.exists()
    runs = _trials(tmp_path, sweep_id)
    assert len(runs) == 3 and sorted(r.sweep_params["train.lr"] for r in runs) == [1e-3, 3e-3, 1e-2]
    assert {r.run_id for r in first} <= {r.run_id for r in runs}
    assert sorted(row[1] for row in table[1:]) == sorted(r.run_id for r in runs)
    said = [line for line in err.splitlines() if line.startswith("unipt: trial ") and " -> " in line]
    assert len(said) == 3 - len(first), err
    for line in said:
        run = next(r for r in runs if line.endswith(r.run_id))
        assert f"val_acc {run.metrics['val_acc']:.4f} (epoch {run.metrics['best_epoch']})" in line, line


def test_resume_trusts_only_the_registry_record_of_a_sweep(tmp_path, capsys):
    from unipt.pipeline.errors import UniptError
    from unipt.pipeline.experiment.sweep import SWEEP_FILE, trusted_spec

    spec = {"sweep_id": "sweep-x", "base": {"backbone": {"trust_remote_code": False}}, "samples": 1}
    folder = tmp_path / "runs" / "sweeps" / "sweep-x"
    folder.mkdir(parents=True)
    (folder / SWEEP_FILE).write_text(json.dumps(spec))
    registry = tmp_path / "registry.sqlite"
    with Registry(str(registry)) as runs:
        runs.list()  # a registry that never saw the sweep start
    with pytest.raises(UniptError, match="holds no record of sweep sweep-x"):
        trusted_spec("sweep-x", folder / SWEEP_FILE, registry)
    with pytest.raises(UniptError, match="holds no record of sweep sweep-x"):
        trusted_spec("sweep-x", folder / SWEEP_FILE, tmp_path / "no-such-registry.sqlite")
    with Registry(str(registry)) as runs:
        runs.record_sweep("sweep-x", spec)
    assert trusted_spec("sweep-x", folder / SWEEP_FILE, registry) == spec
    spec["base"]["backbone"]["trust_remote_code"] = True  # edited in the untrusted folder
    (folder / SWEEP_FILE).write_text(json.dumps(spec))
    with pytest.raises(UniptError, match="was changed after sweep sweep-x started"):
        trusted_spec("sweep-x", folder / SWEEP_FILE, registry)
    args = [
        "sweep",
        "--resume",
        "sweep-x",
        "--runs-root",
        str(tmp_path / "runs"),
        "--registry",
        str(registry),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("unipt: error:") == 1 and "Traceback" not in err and "was changed after" in err
