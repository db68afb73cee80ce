"""The names ``train.method`` accepts, kept here, away from torch, so the config (and the CLI that loads
it) can check a name without importing the methods. :mod:`unipt.train.methods` registers one builder per name
and a test checks the two agree; adding a method adds its name here and its ``register_method`` line."""

from __future__ import annotations

METHOD_NAMES: tuple[str, ...] = ("unipt", "lst", "scalar_mix", "linear_probe")
