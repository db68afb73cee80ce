"""A package's public names, imported from their modules on first use (PEP 562).

Each subpackage's ``__init__`` lists its public surface this way, so ``import unipt.pipeline.cache.layout``
(or the CLI's ``--help``) does not pay for zarr, torch or Ray just because a sibling module needs them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_surface(
    package: str, surface: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``surface`` maps each public name to its module."""

    def __getattr__(name: str) -> Any:
        module = surface.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)  # found once; later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(surface) | set(vars(sys.modules[package])))

    return __getattr__, __dir__
