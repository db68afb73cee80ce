"""The README's Python API example runs as written (on the tiny test config instead of the default one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from unipt.pipeline.runs.records import read_run_record

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_example() -> str:
    text = README.read_text()
    section = text[text.index("## The Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_api_example_runs(shared_extraction, tmp_path, monkeypatch):
    # The cache-alone run has no config: its runs and registry go to ./.unipt (or $UNIPT_HOME, read at
    # import), which would be the checkout's own: a later session's shared cache, the same key, then
    # fails the digest check against the runs registered there.
    monkeypatch.chdir(tmp_path)
    code = python_api_example()
    call = 'load_config("configs/rt_minilm.yaml", ["dataset.limit=600", "train.epochs=2"])'
    assert call in code  # the substitution below must stay in step with the README
    config = shared_extraction.config_in(tmp_path)  # the shared cache, runs and registry in tmp_path
    code = code.replace(call, f'load_config({str(config)!r}, ["train.epochs=2"])')
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    predictions = scope["predictions"]
    assert len(predictions.labels) == 2 and set(predictions.labels) <= {"neg", "pos"}
    assert predictions.probabilities.shape == (2, 2)
    result, again = scope["result"], scope["again"]
    assert result.cache_hit  # the example reused the shared cache
    # The training step alone, on the same cache with the same seed, is the run's training again.
    same = ("test_acc", "val_acc", "test_f1", "best_epoch", "probe_test_acc")
    assert {k: scope["trained"].metrics[k] for k in same} == {k: result.trained.metrics[k] for k in same}
    assert scope["run_dir"] != result.run_dir and read_run_record(scope["run_dir"])["cache"]["hit"]
    # From the cache alone with another learning rate: a run of its own that says so.
    assert again.run_dir.is_dir() and again.run_dir != result.run_dir
    assert read_run_record(again.run_dir)["config"]["train"]["lr"] == 5e-4
    assert again.run_dir.resolve().parent == (tmp_path / ".unipt" / "runs").resolve()
