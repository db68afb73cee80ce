"""What each setting changes, declared on its field, and the lists derived from those declarations.

Every field of the config says ``affects``:

- ``"cache"``: the bytes of the activation cache. The backbone and extraction settings so declared are the
  cache key's fields (:func:`unipt.pipeline.cache.identity.cache_key_fields`); the dataset's reach the key
  through the dataset fingerprint. Another value is another cache.
- ``"training"``: what training computes from a cache. A checkpoint resumes only with the same values
  (:func:`unipt.train.fit.fit_identity`).
- ``None``: neither: where things go, how fast or in how much memory, what else is reported. A run may
  change it, even when it resumes from a checkpoint.

The identity and resume code read these declarations (:func:`names_affecting`, :func:`settings_affecting`)
instead of keeping lists of their own, and ``tests/test_config.py`` fails on a field that declares nothing.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Affects = Literal["cache", "training", None]
AFFECTS: tuple[Affects, ...] = typing.get_args(Affects)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def affects(what: Affects, **extra: Any) -> dict[str, Any]:
    """A field's ``json_schema_extra``: what it changes, plus ``extra`` (e.g. ``default_text``)."""
    if what not in AFFECTS:
        raise ValueError(f"affects {what!r} is not one of {AFFECTS}")
    return {"affects": what, **extra}


def _declared(model: type[BaseModel], name: str) -> dict[str, Any] | None:
    extra = model.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) and "affects" in extra else None


def names_affecting(model: type[BaseModel], what: Affects) -> tuple[str, ...]:
    """The names of ``model``'s fields declared to affect ``what``, in the order they are declared."""
    return tuple(
        name for name in model.model_fields if (d := _declared(model, name)) and d["affects"] == what
    )


def settings_affecting(config: BaseModel, what: Affects, *, but: tuple[str, ...] = ()) -> dict[str, Any]:
    """``config``'s values (as JSON would hold them) of the fields that affect ``what``, except ``but``."""
    values = config.model_dump(mode="json")
    return {name: values[name] for name in names_affecting(type(config), what) if name not in but}


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The section a field opens: a model, or an optional model (``backbone``); None for a setting (a
    mapping of sections, ``backbones``, is a setting that declares itself)."""
    candidates = [annotation, *typing.get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def undeclared(model: type[BaseModel], prefix: str = "") -> list[str]:
    """The dotted names of settings under ``model`` (sections walked into) that declare nothing."""
    missing = []
    for name, field in model.model_fields.items():
        section = section_model(field.annotation)
        if section is not None:
            missing += undeclared(section, f"{prefix}{name}.")
        elif _declared(model, name) is None:
            missing.append(prefix + name)
    return missing
