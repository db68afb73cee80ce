"""The root attributes of a cache store (its ``zarr.json``), typed: what a segment, a view or a cache of
format 2/3 holds there, as the readers use it. The format is specified in ``docs/cache-format.md``; the
writers (:mod:`unipt.pipeline.cache.writer`, :mod:`unipt.pipeline.cache.space`, ``extract/segment.py``,
``extract/runner.py``) still write plain dicts.

The attributes are untrusted input: they are parsed strictly (JSON types only, no coercion, nothing that
runs code), attributes this version does not know are kept (``extra="allow"``: caches of other versions may
hold more), and a malformed one is one :class:`~unipt.pipeline.errors.CacheDamaged` line. Fields that older
formats lack default to what the readers assumed before the attributes were typed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unipt.pipeline.errors import CacheDamaged

_UNTRUSTED = ConfigDict(extra="allow", strict=True, frozen=True)


class SegmentRef(BaseModel):
    """A segment a view reads: its id in the view's activation space and the digest of its
    ``checksums.json`` when the view was written (a segment replaced since is refused)."""

    model_config = _UNTRUSTED

    id: str
    checksums: str | None = None


class CacheAttrs(BaseModel):
    """The root attributes of a segment (``kind: segment``), a view (``kind: view``) or a self-contained
    cache of format 2/3 (no ``kind``). ``layout`` stays a dict: :meth:`StoreLayout.from_json` judges it."""

    model_config = _UNTRUSTED

    format_version: int | None = None
    kind: str | None = None  # layout.SEGMENT_KIND, layout.VIEW_KIND, or None before activation spaces
    complete: bool = False
    cache_key: str | None = None
    space_key: str | None = None  # segments and views
    committed_at: str | None = None
    dataset_fingerprint: str | None = None  # views and format 2/3 caches; a segment has none
    key_fields: dict[str, Any] = {}
    backbone: dict[str, Any] = {}
    tokenizer: dict[str, Any] | None = None
    input: str | None = None  # a view of text pairs says "text_pair"; otherwise the backbone's input
    label_names: list[str] = []
    views: int = Field(default=1, ge=1)  # augmented views per example (views only)
    layers: list[int] | None = None
    hidden_sizes: dict[str, int] | None = None
    grids: dict[str, list[int]] = {}
    dtype: str | None = None
    max_length: int | None = None
    num_examples: int | None = None
    total_tokens: int | None = None
    layout: dict[str, Any] | None = None
    segments: list[SegmentRef] = []  # views only
    space_layers: list[int] | None = None  # a layer-subset view: the layers its segments store


def parse_attrs(attrs: Any, source: str) -> CacheAttrs:
    """``attrs`` (a store's root attributes, as read) typed; a malformed attribute is one CacheDamaged line
    naming it, never a pydantic traceback."""
    try:
        return CacheAttrs.model_validate(attrs)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        what = f"attribute {where} is" if where else "attributes are"
        raise CacheDamaged(
            f"cache {source}: zarr.json {what} malformed ({first['msg']}); "
            f"run `unipt cache verify {source}` and re-extract it"
        ) from exc
