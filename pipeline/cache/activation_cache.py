"""The read API every cache reader offers (:class:`ActivationCache`): what training, export and the admin
commands use, whatever stores the rows. The format is specified in ``docs/cache-format.md``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import cached_property
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from unipt.pipeline import READABLE_FORMAT_VERSIONS
from unipt.pipeline.cache.attrs import CacheAttrs, parse_attrs
from unipt.pipeline.cache.encoding import decode_rows, has_scale
from unipt.pipeline.cache.layout import (
    EXAMPLES_FILE,
    LayerSpec,
    StoreLayout,
    layer_array_name,
    scale_array_name,
)
from unipt.pipeline.errors import CacheDamaged, CacheMissing, UniptError

T = TypeVar("T")


class ActivationCache(ABC):
    """Read access to a committed cache: the interface training, export and the admin commands use.

    Modelled on zarr-python's ``Store(ABC)``: the implementations supply the storage (:meth:`_read`,
    :meth:`nbytes_on_disk`, :meth:`close`) and everything derived from the attributes and the examples
    table (offsets, layers, splits, decoding) is written once here. Implementations:
    :class:`~unipt.pipeline.cache.reader.CacheReader` (one Zarr store: a segment, or a cache of format 2/3),
    :class:`unipt.pipeline.cache.view.ViewReader` (a dataset version, holding the readers of its segments) and
    :class:`unipt.pipeline.cache.hdf5.HDF5CacheReader`. :func:`unipt.pipeline.cache.opener.open_cache` picks
    one.

    A reader holds a read lease (or an open file) until :meth:`close`; use it as a context manager.
    """

    source: str
    attrs: dict[str, Any]
    examples: pa.Table

    view_index: int = (
        0  # which augmented view this reader reads (unipt.pipeline.data.augment); 0: the inputs as is
    )

    @cached_property
    def meta(self) -> CacheAttrs:
        """The root attributes, typed (parsed once; :attr:`attrs` keeps them as read, for what prints them
        all). A malformed attribute is one CacheDamaged line."""
        return parse_attrs(self.attrs, self.source)

    @property
    def num_views(self) -> int:
        """Augmented views stored per example (``extract.views``); 1 for caches without them."""
        return self.meta.views

    def view(self, view: int) -> ActivationCache:
        """This cache as read through augmented view ``view`` (same examples, labels and splits; each
        example's rows are those of its view). View 0 is this reader; only a dataset version's view over
        an activation space stores more (:class:`ViewReader`)."""
        if view != 0:
            raise UniptError(f"cache {self.source} stores no augmented view {view} (it has 1 view)")
        return self

    def _column(self, name: str) -> str:
        """The examples.parquet column ``name`` of the view this reader reads."""
        return name

    def _validate(self, expect: dict[str, Any] | None) -> None:
        meta = self.meta
        if not meta.complete:
            raise CacheMissing(
                f"cache {self.source} is incomplete (extraction did not finish); rerun `unipt extract`"
            )
        version = meta.format_version
        if version is None or version not in READABLE_FORMAT_VERSIONS:
            raise UniptError(
                f"cache {self.source} has format version {version}, this unipt reads versions "
                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}; re-extract it"
            )
        self.format_version: int = version
        stored = meta.key_fields
        for field, wanted in (expect or {}).items():
            have = stored.get(field)
            if have != wanted:
                raise UniptError(
                    f"cache {self.source} was built for another {field.replace('_', ' ')} "
                    f"({short(have)} != {short(wanted)}); re-extract for this config"
                )
        try:
            if meta.layout is None:
                raise KeyError("layout")
            self.layout = StoreLayout.from_json(meta.layout)
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise self._damaged("zarr.json", f"its layout attribute is unreadable ({exc})") from exc
        except UniptError as exc:  # numbers no real cache has: refused before they size anything
            raise self._damaged("zarr.json", f"is not to be trusted: {str(exc).split(';')[0]}") from exc
        self.dtype: str = self.layout.dtype
        self.layers: list[int] = [spec.index for spec in self.layout.layers]
        self.hidden_sizes: dict[int, int] = {spec.index: spec.width for spec in self.layout.layers}
        self.label_names: list[str] = list(meta.label_names)
        self._offsets: dict[str, np.ndarray] = {}
        self._expected_offsets: dict[str, np.ndarray] = {}

    def _damaged(self, what: str, why: str) -> CacheDamaged:
        return CacheDamaged(
            f"cache {self.source}: {what} {why}; run `unipt cache verify {self.source}` and re-extract it"
        )

    def attribute_problems(self) -> list[str]:
        """Where the root attributes contradict their own layout (or, once loaded, the examples table)."""
        layout, meta = self.layout, self.meta
        claims = {
            "dtype": (meta.dtype, layout.dtype),
            "layers": (meta.layers, [s.index for s in layout.layers]),
            "hidden_sizes": (meta.hidden_sizes, {str(s.index): s.width for s in layout.layers}),
            "grids": (meta.grids, {str(s.index): list(s.grid) for s in layout.layers if s.grid}),
            "max_length": (meta.max_length, layout.max_length),
            "num_examples": (meta.num_examples, layout.num_examples),
        }
        problems = [
            f"attribute {name} is {short(have)} but the layout says {short(want)}"
            for name, (have, want) in claims.items()
            if have != want
        ]
        examples = self._loaded_examples()
        if examples is None and getattr(self, "_examples_problem", None):
            problems.append(f"{EXAMPLES_FILE} {self._examples_problem}")
        if examples is not None:
            if examples.num_rows != layout.num_examples:
                problems.append(
                    f"examples.parquet has {examples.num_rows} rows, the layout {layout.num_examples}"
                )
            elif "length" in examples.column_names:
                total = int(pc.sum(examples.column("length")).as_py() or 0)
                if total != meta.total_tokens:
                    problems.append(
                        f"examples.parquet lengths sum to {total}, attribute total_tokens is "
                        f"{meta.total_tokens}"
                    )
        return problems

    def _loaded_examples(self) -> pa.Table | None:
        return self.examples

    def root_digest(self) -> str | None:
        """The store's root digest (:func:`unipt.pipeline.cache.checksums.root_digest`); None where there is
        none."""
        return None

    # --- storage hooks ------------------------------------------------------------------------------------
    @abstractmethod
    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the stored array ``name``, as stored."""

    def _locate_damage(self, name: str, start: int, stop: int, exc: Exception) -> str:
        """What exactly failed in a read of rows ``start:stop`` of array ``name`` (for the error line)."""
        return failure_reason(exc)

    @abstractmethod
    def nbytes_on_disk(self) -> int:
        """Bytes this cache occupies (a view: its own files and every segment it reads)."""

    # --- lifetime -----------------------------------------------------------------------------------------
    @abstractmethod
    def close(self) -> None:
        """Let go of the read lease(s) or the open file; idempotent. Reads after it are undefined."""

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- the API training uses ----------------------------------------------------------------------------
    @property
    def num_examples(self) -> int:
        return int(self.examples.num_rows)

    @property
    def offsets(self) -> np.ndarray:
        """Row ranges of the first stored layer's tokens (all token-sequence layers share them)."""
        return self.offsets_for(self.layers[0])

    def layer_spec(self, layer: int) -> LayerSpec:
        if layer not in self.hidden_sizes:
            raise UniptError(f"layer {layer} is not in cache {self.source} (stored layers: {self.layers})")
        return self.layout.layer(layer)

    def expected_offsets(self, name: str) -> np.ndarray | None:
        """The offsets array ``name`` as the layout and examples.parquet's lengths determine it (None for an
        examples table without lengths): what the stored one must equal, and where rows must exist."""
        if name not in self._expected_offsets:
            if self._column("length") not in self.examples.column_names:
                return None
            spec = next(s for s in self.layout.layers if s.offsets_name == name)
            lengths = self.examples.column(self._column("length")).to_numpy()
            most = self.layout.max_length
            if spec.grid is None and len(lengths) and not (0 <= lengths.min() and lengths.max() <= most):
                raise self._damaged(EXAMPLES_FILE, f"has a length outside 0-{most} (the rows per example)")
            self._expected_offsets[name] = self.layout.offsets(spec, lengths)
        return self._expected_offsets[name]

    def offsets_for(self, layer: int) -> np.ndarray:
        name = self.layer_spec(layer).offsets_name
        if name not in self._offsets:
            offsets = self.read_stored(name, 0, self.layout.num_examples)
            expected = self.expected_offsets(name)
            if expected is not None and not np.array_equal(offsets, expected):
                if offsets.shape != expected.shape:
                    why = f"has shape {list(offsets.shape)}, expected {list(expected.shape)}"
                else:
                    bad = int(np.flatnonzero((offsets != expected).any(axis=1))[0])
                    why = f"example {bad}: rows {offsets[bad].tolist()}, expected {expected[bad].tolist()}"
                raise self._damaged(name, f"does not match the lengths in {EXAMPLES_FILE} ({why})")
            self._offsets[name] = offsets
        return self._offsets[name]

    def read_stored(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a stored array as stored (no decoding); damage is one clear error."""
        return self._checked_read(self._read, name, start, stop)

    def stored_pieces(self, name: str, start: int, stop: int) -> list[tuple[int, np.ndarray]]:
        """Rows ``start:stop`` of a stored array as stored, as ``(first row, rows)`` pieces that cover the
        range in order. Where a store is read out of memory maps (:mod:`unipt.pipeline.cache.chunk_reader`)
        each piece is a read-only view into one chunk file's map, so the rows are copied once, by the caller,
        straight to where they go (the loader's padded batch); elsewhere one piece, read as
        :meth:`read_stored` reads.
        """
        return [(start, self.read_stored(name, start, stop))]

    def _checked_read(self, read: Callable[[str, int, int], T], name: str, start: int, stop: int) -> T:
        """``read(name, start, stop)``, any failure but a UniptError turned into one CacheDamaged line."""
        try:
            return read(name, start, stop)
        except UniptError:
            raise
        except (
            Exception
        ) as exc:  # a codec or checksum error here means damaged bytes, not a bug in the caller
            raise self._damaged_read(name, start, stop, exc) from exc

    def _damaged_read(self, name: str, start: int, stop: int, exc: Exception) -> CacheDamaged:
        return CacheDamaged(
            f"cache {self.source}: {name} rows {start}-{stop} could not be read "
            f"({self._locate_damage(name, start, stop, exc)}); "
            f"run `unipt cache verify {self.source}` and re-extract if it is damaged"
        )

    def read_rows(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a layer, decoded (float16 for fp16 caches, float32 otherwise)."""
        self.layer_spec(layer)
        stored = self.read_stored(layer_array_name(layer), start, stop)
        scale = self.read_stored(scale_array_name(layer), start, stop) if has_scale(self.dtype) else None
        return decode_rows(stored, self.dtype, scale)

    def read_example(self, index: int, layer: int) -> np.ndarray:
        """One example's rows of a layer; a feature-map layer comes back as [H, W, C]."""
        start, stop = self.offsets_for(layer)[index]
        rows = self.read_rows(layer, int(start), int(stop))
        grid = self.layer_spec(layer).grid
        return rows.reshape(grid[0], grid[1], -1) if grid else rows

    def split_indices(self, split: str) -> np.ndarray:
        splits = self.examples.column("split").to_numpy(zero_copy_only=False)
        return np.flatnonzero(splits == split)

    def labels(self) -> np.ndarray:
        return self.examples.column("label").to_numpy()


def failure_reason(exc: Exception) -> str:
    """What a failed read says, in one line of an error message (a codec's checksum error in words)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, ValueError) and "checksum do not match" in text:
        return "its crc32c checksum does not match its bytes"
    return f"{type(exc).__name__}: {text}"


def short(value: Any) -> str:
    """``value`` cut to a few characters, for an error line that compares two of them."""
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 16 else text[:12] + "..."
