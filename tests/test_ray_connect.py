"""How `unipt extract` connects to Ray (extract/ray_session.py): every address that cannot be used fails
fast, in one line naming it, and leaves nothing behind in the cache root.

Each case runs the CLI in its own process, as a user would: a failed or abandoned ray.init() must not
leak into the test process.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from unipt.extract.ray_session import root_cause
from unipt.pipeline.errors import UniptError

pytestmark = pytest.mark.faults

RAY = str(Path(sys.executable).with_name("ray"))


def _extract(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "unipt.pipeline.cli", "extract", str(config), "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    return result, time.monotonic() - started


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one `unipt: error:` line, checked to be the only line about the failure (no traceback)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("unipt: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _nothing_left(root: Path) -> None:
    """No lock file, no partial store: an extraction that never started leaves the cache root as it was."""
    cache = root / "cache"
    assert not list(cache.rglob("*.lock")) if cache.exists() else True
    assert not (cache / ".partial").exists() or not any((cache / ".partial").iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_address_fails_fast_in_one_line_and_leaves_no_lock(tiny_config, tmp_path):
    result, seconds = _extract(tiny_config, "--ray-address", "127.0.0.1:1")
    line = _error_line(result)
    assert line.startswith("unipt: error: cannot reach the Ray cluster at 127.0.0.1:1 (Connection refused)")
    assert "ray start --head" in line and "leave --ray-address and RAY_ADDRESS unset" in line
    assert seconds < 30
    _nothing_left(tmp_path)


def test_ray_address_from_the_environment_is_honoured(tiny_config, tmp_path):
    result, seconds = _extract(tiny_config, env={"RAY_ADDRESS": "127.0.0.1:1"})
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in _error_line(result)
    assert seconds < 30
    _nothing_left(tmp_path)


def test_a_ray_client_address_needs_the_client_extra(tiny_config, tmp_path):
    result, _ = _extract(tiny_config, "--ray-address", "ray://127.0.0.1:1")
    line = _error_line(result)
    if importlib.util.find_spec("grpc") is None:  # this environment: Ray without the client extra
        assert "uses Ray Client, which needs the ray[client] extra (grpcio)" in line
        assert "pip install 'ray[client]==" in line
    else:  # with the extra, ray:// is used, and an unreachable one fails like any other
        assert "cannot reach the Ray cluster at ray://127.0.0.1:1" in line
    _nothing_left(tmp_path)


def test_an_address_that_accepts_tcp_but_never_answers_as_ray_gives_up_in_time(tmp_path):
    """A port held by something that is not a Ray head: ray.init() alone would retry for minutes."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    threading.Thread(
        target=lambda: accepted.extend(iter(lambda: listener.accept()[0], None)), daemon=True
    ).start()
    script = (
        "import unipt.extract.ray_session as s\n"
        "s.CONNECT_TIMEOUT_S = 3\n"  # the 30 s of the real thing, shortened for the test
        "from unipt.pipeline.errors import UniptError\n"
        "try:\n"
        f"    s.connect('127.0.0.1:{port}')\n"
        "except UniptError as exc:\n"
        "    print(exc)\n"
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    listener.close()
    assert result.returncode == 0, result.stderr
    assert f"the Ray cluster at 127.0.0.1:{port} did not answer within 3s" in result.stdout
    assert "RAY_AUTH_TOKEN" in result.stdout  # the other usual reason: a token-protected cluster
    assert time.monotonic() - started < 60  # the process exits although ray.init() is still stuck


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """`ray start --head` with no CPUs, its own temp dir and ports, and its own token; killed by process
    group at the end (never `ray stop`: that would stop every Ray on this machine)."""
    private = tempfile.mkdtemp(prefix="uh", dir="/tmp")  # short: Ray's socket paths live under it
    port = _free_port()
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_TMPDIR": private, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    ports = {
        "--port": port,
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
    }
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--num-cpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ]
        + [f"--temp-dir={private}/ray"]
        + [f"{flag}={value}" for flag, value in ports.items()],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "ray-head.log", "w"),  # noqa: SIM115 - closed with the process
        start_new_session=True,  # its own process group: the whole head goes with one kill
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None, (tmp_path / "ray-head.log").read_text()
                assert time.monotonic() < deadline, "ray start --head did not come up in 90s"
                time.sleep(0.5)
        time.sleep(2.0)  # the raylet registers a moment after the GCS port opens
        yield f"127.0.0.1:{port}", {"RAY_TMPDIR": private, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=15)
                time.sleep(1.0)  # let the group's other processes go too
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(private, ignore_errors=True)


def test_a_reachable_cluster_with_no_room_fails_fast_naming_what_was_asked(ray_head, tiny_config, tmp_path):
    """`ray start --head --num-cpus=0`: joined (with its token), then refused in one line at once."""
    address, env = ray_head
    result, seconds = _extract(tiny_config, "--ray-address", address, env=env)
    line = _error_line(result)
    assert (
        "extract.workers=auto asks for 1 worker of 1 CPU each, but the Ray cluster has room for none now"
        in line
    )
    assert "0 of 0 CPU free" in line
    assert seconds < 60
    _nothing_left(tmp_path)


def test_a_cluster_that_refuses_our_token_fails_in_one_line(ray_head, tiny_config, tmp_path):
    address, env = ray_head
    wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    result, seconds = _extract(tiny_config, "--ray-address", address, env=wrong)
    line = _error_line(result)
    assert f"the Ray cluster at {address} refused authentication" in line
    assert "RAY_AUTH_TOKEN" in line
    assert seconds < 45
    _nothing_left(tmp_path)


def test_root_cause_is_the_workers_own_error_in_one_line():
    from ray.exceptions import ActorDiedError, RayTaskError

    inner = ValueError("bad input\nsecond line")
    wrapped = RayTaskError(
        "run_shard", "Traceback (most recent call last):\n  ...\nValueError: bad input", inner
    )
    assert root_cause(wrapped) == "ValueError: bad input"
    user = RayTaskError("run_shard", "Traceback ...", UniptError("shard 3: no rows for layer 2; re-extract"))
    assert root_cause(user.as_instanceof_cause()) == "shard 3: no rows for layer 2; re-extract"
    died = ActorDiedError()
    assert root_cause(died) == "ActorDiedError: The actor died unexpectedly before finishing this task."
