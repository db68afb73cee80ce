"""The README's Python API example runs as written (on the tiny test config instead of the default one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_example() -> str:
    text = README.read_text()
    section = text[text.index("## The Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_api_example_runs(tiny_config, ray_session):
    code = python_api_example()
    call = 'load_config("configs/rt_minilm.yaml", ["dataset.limit=600", "train.epochs=2"])'
    assert call in code  # the substitution below must stay in step with the README
    code = code.replace(call, f'load_config({str(tiny_config)!r}, ["train.epochs=2"])')
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    predictions = scope["predictions"]
    assert len(predictions.labels) == 2 and set(predictions.labels) <= {"neg", "pos"}
    assert predictions.probabilities.shape == (2, 2)
    assert scope["again"].run_dir.is_dir() and scope["again"].trained.metrics["test_acc"] > 0
    assert scope["again"].run_dir != scope["result"].run_dir
