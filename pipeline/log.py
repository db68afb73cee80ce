"""The ``unipt`` logger: every stage reports progress through it; the CLI decides where it goes.

Library code calls :func:`say` (INFO) or ``log.warning``; nothing prints directly, so a Python user of
:mod:`pipeline.experiment` chooses what to see with the standard :mod:`logging` setup, and the CLI shows
each message as one ``unipt: ...`` line on stderr.
"""

from __future__ import annotations

import logging
import sys

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
