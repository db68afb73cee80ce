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
