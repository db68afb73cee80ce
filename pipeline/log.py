"""The ``unipt`` logger: every stage reports progress through it, never by printing.

Library code calls :func:`say` (INFO) or ``log.warning``; nothing prints directly. By default every
message is one ``unipt: ...`` line on stderr, for the CLI and a Python user of
:mod:`unipt.pipeline.experiment.recipe`
alike (progress is what a long job owes its user); quieter is one standard call away:
``logging.getLogger("unipt").setLevel(logging.WARNING)``. Records also propagate, so a host that set up
:mod:`logging` (pytest, a notebook, a service) sees them too.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("unipt")


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``: sizes as people read them."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def utc_timestamp() -> str:
    """``2026-12-07T05:37:46Z``: when a cache was committed or a run made, as records and attributes say it
    (UTC, to the second, so it sorts as text)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def say(message: str) -> None:
    """One progress line for the user (INFO on the ``unipt`` logger)."""
    log.info(message)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the message (tests and notebooks swap it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("unipt: %(message)s"))

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - logging's own attribute
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns it; the property always wins
        pass


def configure_cli_logging(level: int = logging.INFO) -> None:
    """Show the ``unipt`` logger's messages as ``unipt: ...`` lines on stderr (idempotent)."""
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    log.setLevel(level)
    # Records still propagate: the root logger has no handler in the CLI (so nothing prints twice),
    # and a host that configured logging (pytest, a notebook) keeps seeing them.


configure_cli_logging()  # the default: see the module docstring
