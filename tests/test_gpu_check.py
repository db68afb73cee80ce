"""benchmarks/gpu_check.sh must keep working on a CPU-only machine: it runs the CPU parts, says "no GPU"
and exits 0 (on a GPU machine it prints the GPU table; that is not run here)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the check runs its full table")
def test_gpu_check_runs_the_cpu_parts_and_says_no_gpu(tmp_path, tiny_config):
    import sys

    env = {**os.environ, "UNIPT_PYTHON": sys.executable}
    result = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu_check.sh"), "--config", str(tiny_config), "--limit", "120",
         "--epochs", "1", "--cache-root", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no GPU" in result.stdout
    for measure in ("loader", "UniPT step (cpu)", "training from loader", "cache read rate",
                    "backbone forward (cpu)", "one pass: cache vs recompute"):  # fmt: skip
        assert measure in result.stdout
    assert "of step time waiting for data" in result.stdout
    # Each row is printed as it is measured (a check stopped by its time limit keeps them), before the table.
    lines = result.stdout.splitlines()
    live = [i for i, line in enumerate(lines) if line.startswith("row: ")]
    assert lines[live[0]].startswith("row: loader | ") and len(live) >= 5
    table = next(i for i, line in enumerate(lines) if line.split()[:1] == ["measure"])
    assert max(live) < table
    # The read path against recomputing: both rates measured, and which pass is faster, by how much.
    assert re.search(r"cache read rate +[0-9.]+ GB/s decoded", result.stdout)
    assert re.search(r"backbone forward \(cpu\) +[0-9,]+ tokens/s", result.stdout)
    assert re.search(r"(the cache|recomputing) is [0-9.]+x faster; they tie at [0-9.]+ GB/s", result.stdout)
