"""The whole job as a user runs it: `unipt run` twice, `unipt train`, in fresh interpreters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.e2e

# Runs a CLI command in a fresh interpreter, then fails if that process ever imported a backbone.
NO_BACKBONE_CHECK = """
import sys
from unipt.pipeline.cli.app import main
assert main({argv!r}) == 0
loaded = [m.split('.') for m in sys.modules]
backbone = sorted('.'.join(m) for m in loaded if m[0] == 'transformers' or m[:2] == ['extract', 'backbones'])
assert not backbone, backbone
print('NO_BACKBONE_IN_PROCESS')
"""


def run_cli_without_backbone(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", NO_BACKBONE_CHECK.format(argv=list(args))],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NO_BACKBONE_IN_PROCESS" in result.stdout
    return result


def _records(runs_root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(runs_root.glob("*/record.json"))]


def _without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history]


def test_run_twice_reuses_cache_and_reproduces_metrics(tiny_config, tmp_path):
    first = run_cli_without_backbone(
        "run", str(tiny_config), "--no-progress"
    )  # extraction ran in Ray workers
    assert "cache miss" in first.stderr and "cache miss" in first.stdout

    second = run_cli("run", str(tiny_config), "--no-progress")
    assert "cache hit" in second.stderr and "no backbone forward pass" in second.stderr
    assert "(cache hit)" in second.stdout

    one, two = _records(tmp_path / "runs")
    assert one["cache"]["key"] == two["cache"]["key"]
    assert (one["cache"]["hit"], two["cache"]["hit"]) == (False, True)
    assert one["metrics"]["test_acc"] == two["metrics"]["test_acc"]
    assert _without_timing(one["history"]) == _without_timing(two["history"])
    assert one["dataset"]["fingerprint"] == two["dataset"]["fingerprint"]
    for field in ("config", "seed", "metrics", "versions"):
        assert field in one
    assert one["config"]["train"]["epochs"] == 12
    assert one["metrics"]["test_acc"] > 0.6  # the sentiment words are learnable even from a random BERT
    assert 0 < one["cache"]["bytes_on_disk"] < 10 * 2**20
    assert len(one["layer_weights"]) == 2


def test_train_process_never_imports_the_backbone(tiny_config):
    run_cli("extract", str(tiny_config), "--no-progress")
    result = run_cli_without_backbone("train", str(tiny_config), "--no-progress")
    assert "test acc" in result.stdout  # the summary line: the run trained and was recorded


def test_train_without_cache_says_how_to_fix(tiny_config):
    result = run_cli("train", str(tiny_config), check=False)
    assert result.returncode == 2
    assert "run `unipt extract" in result.stderr
    assert result.stderr.count("\n") == 1  # one line, no traceback
