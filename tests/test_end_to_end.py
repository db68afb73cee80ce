"""The whole job as a user runs it: `unipt run` twice, `unipt train`, in fresh interpreters."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import run_cli

# Runs a CLI command in-process, then fails if the process ever imported transformers.
NO_BACKBONE_CHECK = """
import sys
from pipeline.cli import main
rc = main({argv!r})
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'extract') and m != 'extract')
assert rc == 0, rc
assert not any(m.startswith('transformers') or m == 'extract.backbones' for m in loaded), loaded
print('NO_BACKBONE_IN_PROCESS')
"""


def _records(runs_root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(runs_root.glob("*/record.json"))]


def test_run_twice_reuses_cache_and_reproduces_metrics(tiny_config, tmp_path):
    import subprocess

    first = subprocess.run(
        [sys.executable, "-c", NO_BACKBONE_CHECK.format(argv=["run", str(tiny_config), "--no-progress"])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "NO_BACKBONE_IN_PROCESS" in first.stdout  # extraction ran in Ray workers, not here
    assert "cache miss" in first.stderr and "cache miss" in first.stdout

    second = run_cli("run", str(tiny_config), "--no-progress")
    assert "cache hit" in second.stderr and "no backbone forward pass" in second.stderr
    assert "(cache hit)" in second.stdout

    one, two = _records(tmp_path / "runs")
    assert one["cache"]["key"] == two["cache"]["key"]
    assert (one["cache"]["hit"], two["cache"]["hit"]) == (False, True)
    assert one["metrics"]["test_acc"] == two["metrics"]["test_acc"]
    assert one["history"] == [
        {**h, "seconds": one["history"][i]["seconds"]} for i, h in enumerate(two["history"])
    ]
    assert one["dataset"]["fingerprint"] == two["dataset"]["fingerprint"]
    for field in ("config", "seed", "metrics", "versions"):
        assert field in one
    assert one["config"]["train"]["epochs"] == 12
    assert one["metrics"]["test_acc"] > 0.6  # the sentiment words are learnable even from a random BERT
    assert 0 < one["cache"]["bytes_on_disk"] < 10 * 2**20
    assert len(one["layer_weights"]) == 2


def test_train_process_never_imports_the_backbone(tiny_config):
    run_cli("extract", str(tiny_config), "--no-progress")
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", NO_BACKBONE_CHECK.format(argv=["train", str(tiny_config), "--no-progress"])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NO_BACKBONE_IN_PROCESS" in result.stdout
    assert "test_acc" in result.stdout


def test_train_without_cache_says_how_to_fix(tiny_config):
    result = run_cli("train", str(tiny_config), check=False)
    assert result.returncode == 2
    assert "run `unipt extract" in result.stderr
    assert result.stderr.count("\n") == 1  # one line, no traceback
