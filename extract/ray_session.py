"""The one place that connects to Ray and turns Ray's errors into one line for the user.

Connection rules (``--ray-address`` / ``RAY_ADDRESS``):

* none: a new local Ray instance, always (``address="local"``), never whatever ``ray start`` left in
  Ray's temp dir: a run on a laptop must not silently land on a stale cluster;
* ``HOST:PORT`` or ``auto``: join that cluster, or fail within :data:`CONNECT_TIMEOUT_S` with one line
  naming the address and what to do (Ray itself retries an unreachable address for minutes);
* ``ray://HOST:PORT``: Ray Client, only when the ``ray[client]`` extra (grpcio) is installed; otherwise
  refused in one line saying so.

While an extraction runs, :class:`HeadWatch` probes the head: a head that is gone (killed, its machine
lost) ends the process in one line naming the command that resumes, before Ray's core worker ends it
itself after 60 s with its own "Failed to connect to GCS" message and exit 1.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import AuthenticationError, RayActorError, RayError

from unipt.pipeline.errors import UniptError

CONNECT_TIMEOUT_S = 30.0  # the whole join, probe included
PROBE_TIMEOUT_S = 5.0  # a plain TCP connect to the head: refused or silent addresses fail here, fast
# A head unreachable this long is lost: half of the 60 s after which Ray's core worker ends the driver
# itself (gcs_rpc_server_reconnect_timeout_s), long enough for a fault-tolerant GCS to come back.
HEAD_LOST_AFTER_S = 30.0
HEAD_PROBE_EVERY_S = 1.0
_RAY_OPTIONS: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
_LOCAL_HINT = "or leave --ray-address and RAY_ADDRESS unset to start a local Ray"


def connect(address: str | None) -> bool:
    """Start or join a Ray session; True if this call did, so the caller must ``ray.shutdown()`` it.

    Nothing happens (False) if this process is already connected: e.g. ``unipt sweep`` connects once
    for its extraction and its trials.
    """
    if ray.is_initialized():
        return False
    quiet_ray_output()
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip() or None
    if address is None or address == "local":
        ray.init(address="local", **_RAY_OPTIONS)
        return True
    if address.startswith("ray://"):
        if importlib.util.find_spec("grpc") is None:
            raise UniptError(
                f"--ray-address {address} uses Ray Client, which needs the ray[client] extra (grpcio); "
                f"install it with pip install 'ray[client]=={ray.__version__}', or give the head's GCS "
                f"address HOST:6379 instead, {_LOCAL_HINT}"
            )
        _probe(address, address.removeprefix("ray://"))
    elif address != "auto":
        _probe(address, address)
    _init_within(address, CONNECT_TIMEOUT_S)
    return True


class _DropNotice(logging.Filter):
    """Drops one of Ray's log messages by its text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# Said by every new local Ray at start, in every run and sweep log; authentication stays on (it is Ray's
# default), only the notice goes. The "disabled" warning is kept: that one is a risk worth reading.
_AUTH_NOTICE = (
    "ray._private.authentication.authentication_token_setup",
    "Token authentication is enabled for",
)


def quiet_ray_output() -> None:
    """Keep Ray's own chatter out of unipt's logs (idempotent; a setting the user made is kept):

    * the token-authentication notice every local start prints (authentication itself stays on);
    * log deduplication (``RAY_DEDUP_LOGS=0``): Ray folds a line that several workers print into one
      with ``[repeated Nx across cluster]`` and a paragraph on how to turn that off, coloured; unipt's
      workers say little, so each line is printed as it was said, with the worker it came from;
    * the ANSI colour codes of the ``(Worker pid=...)`` prefixes when stderr is not a terminal
      (``RAY_COLOR_PREFIX=0``), so a log file holds plain text.
    """
    name, text = _AUTH_NOTICE
    auth_logger = logging.getLogger(name)
    if not any(isinstance(f, _DropNotice) and f.text == text for f in auth_logger.filters):
        auth_logger.addFilter(_DropNotice(text))
    if "RAY_DEDUP_LOGS" not in os.environ:
        os.environ["RAY_DEDUP_LOGS"] = "0"  # for processes started from here
        # Ray reads the variable once, when it is imported (it is here): the driver's copy decides.
        from ray._private import ray_logging

        if hasattr(ray_logging, "RAY_DEDUP_LOGS"):
            ray_logging.RAY_DEDUP_LOGS = False
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # read at every printed line


def _probe(address: str, host_port: str) -> None:
    host, sep, port = host_port.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UniptError(
            f"--ray-address {address!r} is not HOST:PORT, auto or ray://HOST:PORT; give the Ray head's "
            f"address (e.g. 10.0.0.5:6379), {_LOCAL_HINT}"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UniptError(
            f"cannot reach the Ray cluster at {address} ({reason}); start it with `ray start --head` "
            f"there, check the address and port (the head's GCS port, 6379 by default), {_LOCAL_HINT}"
        ) from exc


def same_command() -> str:
    """The command this process runs, as the user would type it again (``unipt extract ...``)."""
    argv = sys.argv
    if argv and (Path(argv[0]).name == "unipt" or argv[0].endswith(_CLI_MAINS)):
        return "`unipt " + shlex.join(argv[1:]) + "`"
    return "the same command"


# What sys.argv[0] is under `python -m unipt` and `python -m unipt.pipeline.cli`.
_CLI_MAINS = (os.path.join("unipt", "__main__.py"), os.path.join("pipeline", "cli", "__main__.py"))


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


class HeadWatch:
    """Watches the Ray head (its GCS port) from a thread while Ray is used; a lost head ends the process.

    Ray gives a driver no error when its head dies: calls wait, and after 60 s its C++ core exits the
    process with exit 1 and a message naming neither the cause nor the fix; nothing in Python can stop
    that. So the watch says it first, in one line, and exits 2 as the CLI does for every error. Exiting
    mid-extraction is what a kill -9 is: finished shards are kept, and ``resume`` (the fix it names)
    continues from them. ``start`` after each connect; ``stop`` before ``ray.shutdown()``.
    """

    def __init__(self, resume: str) -> None:
        self.resume = resume
        self.address: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing_since: float | None = None
        self._failed = threading.Lock()

    def start(self) -> None:
        if self._thread is not None or not ray.is_initialized():
            return
        address = ray.get_runtime_context().gcs_address
        host, _, port = str(address).rpartition(":")
        if not host or not port.isdigit():
            return  # Ray Client or an unknown form: nothing we can probe
        self.address = address
        target = (host.strip("[]"), int(port))
        self._thread = threading.Thread(target=self._watch, args=target, name="unipt-ray-head", daemon=True)
        self._thread.start()

    def _watch(self, host: str, port: int) -> None:
        while not self._stop.wait(HEAD_PROBE_EVERY_S):
            if _reachable(host, port):
                self._failing_since = None
                continue
            self._failing_since = self._failing_since or time.monotonic()
            if time.monotonic() - self._failing_since >= HEAD_LOST_AFTER_S and not self._stop.is_set():
                self.fail_now(f"it has not answered for {HEAD_LOST_AFTER_S:.0f}s")

    def head_lost(self, fresh: bool = False) -> bool:
        """Whether the head is unreachable now: after a failed probe (or, ``fresh``, any time), asked
        again at once."""
        if self.address is None or not (fresh or self._failing_since is not None):
            return False
        host, _, port = self.address.rpartition(":")
        return not _reachable(host.strip("[]"), int(port))

    def fail_now(self, why: str = "it does not answer") -> None:
        """Say that the head is lost, in one line, and end the process (exit 2): ``ray.shutdown()`` and
        Ray's exit handler would wait on the lost head for a minute, then exit 1 in Ray's words."""
        with self._failed:  # the watch and the main thread may both get here: one line only
            sys.stdout.flush()
            message = (
                f"unipt: error: lost the Ray head at {self.address} ({why}): it was stopped or its machine "
                f"is gone; {self.resume}\n"
            )
            os.write(2, message.encode())
            os._exit(2)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class _DropThreadWarning(logging.Filter):
    """Ray warns that it cannot install its SIGTERM handler off the main thread; harmless here (a
    terminated driver's actors are cleaned up by the cluster), so keep it out of the user's terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


@contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """Capture file descriptor 2 (what Ray's C++ core writes while it retries a join) into a temp file.

    A refused join makes Ray's core print one warning a second for 20 s, ending in an error that does
    not say why; the reason (e.g. ``InvalidAuthToken``) is only in those warnings. Capturing them keeps
    the failure to our one line and lets us name the reason. Yields a reader of what was captured.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield lambda: (capture.seek(0), capture.read().decode(errors="replace"))[1]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _init_within(address: str, timeout_s: float) -> None:
    # ray.init() blocks inside C++ for minutes on an address that accepts TCP but never answers as a
    # Ray head; it cannot be interrupted, so it runs in a daemon thread and we stop waiting after
    # timeout_s. The CLI then exits; the abandoned thread dies with the process.
    outcome: dict[str, BaseException | None] = {}

    def join() -> None:
        try:
            ray.init(address=address, **_RAY_OPTIONS)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    quiet = _DropThreadWarning()
    ray_logger = logging.getLogger("ray._private.worker")
    ray_logger.addFilter(quiet)
    try:
        with _stderr_captured() as captured:
            thread = threading.Thread(target=join, name="unipt-ray-connect", daemon=True)
            thread.start()
            thread.join(timeout_s)
            said = captured()
    finally:
        ray_logger.removeFilter(quiet)
    error = outcome.get("error")
    if "error" in outcome and error is None:
        sys.stderr.write(said)  # joined: whatever Ray had to say is the user's to see
        return
    refused = (
        "InvalidAuthToken" in said or "Unauthenticated" in said or isinstance(error, AuthenticationError)
    )
    if refused:
        raise UniptError(
            f"the Ray cluster at {address} refused authentication; set RAY_AUTH_TOKEN (or "
            f"RAY_AUTH_TOKEN_PATH) to the cluster's token, {_LOCAL_HINT}"
        ) from error
    if "error" not in outcome:
        raise UniptError(
            f"the Ray cluster at {address} did not answer within {timeout_s:.0f}s; check that it is a Ray "
            f"{ray.__version__} head (its GCS address, HOST:6379 by default) and, if it uses token "
            f"authentication, that RAY_AUTH_TOKEN holds its token, {_LOCAL_HINT}"
        )
    assert error is not None
    if isinstance(error, UniptError | KeyboardInterrupt):
        raise error
    raise UniptError(
        f"cannot connect to the Ray cluster at {address}: {root_cause(error)}; start one with "
        f"`ray start --head`, or check the address, {_LOCAL_HINT}"
    ) from error


def root_cause(exc: BaseException) -> str:
    """The short cause of a Ray error, one line: what failed inside the worker, not Ray's wrapping.

    A ``RayTaskError`` becomes the worker's own exception (``ValueError: ...``); a ``UniptError`` raised
    in a worker becomes its message alone (it already says what to do); an actor that died becomes
    ``ActorDiedError: <what Ray knows about why>``, or its constructor's error if ``__init__`` failed.
    """
    cause = exc
    seen = {id(cause)}
    while True:
        # A RayTaskError raised for a UniptError is also a UniptError (Ray subclasses both): descend
        # past Ray's wrapper, stop at the user's error.
        if isinstance(cause, UniptError) and not isinstance(cause, RayError):
            break
        inner = getattr(cause, "cause", None) or cause.__cause__
        if not isinstance(inner, BaseException) or id(inner) in seen:
            break
        seen.add(id(inner))
        cause = inner
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    if "Traceback (most recent call last)" in str(cause):
        # A traceback inside the message: its last "Type: message" line is the cause.
        typed = [line for line in lines if ": " in line and " " not in line.split(": ", 1)[0]]
        return typed[-1] if typed else f"{type(cause).__name__}: {lines[-1]}"
    if isinstance(cause, UniptError) and not isinstance(cause, RayError):
        return lines[-1] if lines else type(cause).__name__
    if isinstance(cause, RayActorError) and not cause.actor_init_failed:
        # First line: what happened; last line: why (e.g. "The actor is dead because its node died").
        text = " ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
        return f"{type(cause).__name__}: {text}"
    name = type(cause).__name__
    if not isinstance(cause, RayError):
        return f"{name}: {lines[0] if lines else ''}"
    # Ray's own text is a traceback ending in the worker's "Type: message" line.
    last = lines[-1] if lines else ""
    if ": " in last and " " not in last.split(": ", 1)[0]:
        return last
    return f"{name}: {last}"
