"""What the CLI writes when a tool or a log file reads it, not a person at a terminal."""

from __future__ import annotations

from pathlib import Path

from conftest import KEY, build_cache, run_cli

from pipeline.cache import CacheRoot


def test_progress_bars_stay_out_of_a_log_file(tmp_path: Path):
    """stderr is a pipe here, as in a log file: no bar, no carriage returns or cursor escapes."""
    root = CacheRoot(tmp_path / "cache")
    build_cache(root, [3, 5, 2, 4, 6, 1, 2], {0: 4, 1: 4}, shard_size=2)
    result = run_cli("cache", "verify", str(root.location(KEY)))
    assert result.stdout.startswith("ok:")
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr and "file/s" not in result.stderr


def test_unipt_home_is_where_every_command_looks_wherever_it_runs(tmp_path: Path):
    import os
    import subprocess
    import sys

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    build_cache(CacheRoot(home / "cache"), [3, 5, 2], {0: 4}, shard_size=2)
    (elsewhere / "c.yaml").write_text("dataset: {source: d.csv}\nbackbone: {name_or_path: m}\n")
    env = {**os.environ, "UNIPT_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def unipt(*args: str) -> str:
        command = [sys.executable, "-m", "pipeline.cli", *args]
        done = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert KEY in unipt("cache", "ls")
    storage = subprocess.run(
        [
            sys.executable,
            "-c",
            "from pipeline.config import load_config; print(load_config('c.yaml').storage)",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("cache", "runs", "registry.sqlite"):
        assert f"{home}/{name}" in storage
