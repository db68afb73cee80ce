"""The shape of a cache store: which arrays it has, how rows are reserved per extraction shard.

Every stored layer is one 2-D array ``[rows, width]`` chunked along rows. Two kinds of layers:

- **token sequences** (text encoders, ViT): example *i* owns ``lengths[i]`` rows (its real tokens,
  no padding); all sequence layers share one ``offsets`` array.
- **feature maps** (CNN stages): an ``[H, W, C]`` map is stored as ``H*W`` rows of ``C`` channels
  (row-major over H, W); the grid ``[H, W]`` is recorded per layer and the layer has its own
  ``offsets_XX`` array, because its rows per example differ from other layers'.

Extraction is cut into shards of ``shard_size`` examples. Each shard owns, in every layer, a row
range that starts on a file boundary (a chunk, or a shard file when Zarr sharding is on) and is
sized for its worst case, so parallel writers never touch the same file. Rows a shard leaves
unused are never written and take no disk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from unipt.pipeline.cache.encoding import CODECS, SHUFFLES, STORAGE_DTYPES, has_scale
from unipt.pipeline.errors import UniptError

OFFSETS = "offsets"
EXAMPLES_FILE = "examples.parquet"
SHARD_MARKERS = "_shards"
METADATA_FILE = "zarr.json"


def layer_array_name(layer: int) -> str:
    return f"layer_{layer:02d}"


def scale_array_name(layer: int) -> str:
    return f"layer_{layer:02d}_scale"


def grid_offsets_name(layer: int) -> str:
    return f"offsets_{layer:02d}"


def view_column(name: str, view: int) -> str:
    """A view's examples.parquet column (``length``, ``input_hash``, ``segment``, ``row``) for augmented
    view ``view`` (:mod:`unipt.pipeline.data.augment`): ``name`` itself for view 0, ``name_<view>`` after
    it."""
    return name if view == 0 else f"{name}_{view}"


# What a store under a cache root is (its root attribute ``kind``; see docs/cache-format.md): a dataset
# version's *view*, or a *segment* of an activation space. Here, not in cache.py, so that the view
# reader's logic (pipeline/cache/view.py) needs nothing from the module that builds on it.
VIEW_KIND = "view"
SEGMENT_KIND = "segment"


@dataclass(frozen=True)
class LayerSpec:
    """One stored hidden state: its index in the backbone's outputs, width, and grid for feature maps."""

    index: int
    width: int
    grid: tuple[int, int] | None = None

    @property
    def offsets_name(self) -> str:
        return OFFSETS if self.grid is None else grid_offsets_name(self.index)


# ``extract.chunk_rows: auto`` keeps a chunk near this many values: 4096 rows at MiniLM's width 384, where
# benchmarks/cache_codecs.py chose 4096. Wider layers get fewer rows per chunk, because a loader reads
# blocks of whole examples whose size its memory budget caps by bytes (train.loader_memory_mb): at BERT-large
# width a block is ~1,200 rows, and every chunk it touches is decoded whole, so 4096-row chunks were each
# decoded about four times per epoch.
AUTO_CHUNK_VALUES = 4096 * 384
MIN_AUTO_CHUNK_ROWS, MAX_AUTO_CHUNK_ROWS = 256, 4096

# Sane limits for what a layout read from a store's ``zarr.json`` may claim. A layout sizes lists and arrays
# (the shard plan, offsets), so a number edited into a file must be refused before anything is allocated,
# not become a runaway process: each limit is orders of magnitude above any real cache.
MAX_EXAMPLES = 2**31 - 1
MAX_SHARDS = 2**20  # the shard plan is a list: 1M shards of the default 512 examples is 512M examples
MAX_ROWS_PER_EXAMPLE = 2**20  # max_length, or H*W of a feature map
MAX_WIDTH = 2**16  # hidden size / channels (the largest backbones have ~2**14)
MAX_LAYERS = 1024
MAX_CHUNK_ROWS = 2**24
MAX_CHUNKS_PER_FILE = 2**16


def resolve_chunk_rows(setting: int | str, widths: list[int]) -> int:
    """Rows per chunk for a store whose layers have ``widths``: ``setting`` itself, or for ``"auto"`` the
    largest power of two of rows that keeps the widest layer's chunk within :data:`AUTO_CHUNK_VALUES` values
    (256 to 4096 rows)."""
    if setting != "auto":
        return int(setting)
    fits = max(1, AUTO_CHUNK_VALUES // max([1, *widths]))
    rows = 1 << (fits.bit_length() - 1)  # the largest power of two <= fits
    return min(MAX_AUTO_CHUNK_ROWS, max(MIN_AUTO_CHUNK_ROWS, rows))


@dataclass(frozen=True)
class ArraySpec:
    """What one array of a store must look like: the writer creates it so, the reader checks it is so."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_rows: int  # rows per chunk (the unit a codec encodes)
    rows_per_file: int  # rows per file: chunk_rows, or a whole shard file when Zarr sharding is on
    layer: LayerSpec | None = None  # None for offsets arrays

    @property
    def chunks(self) -> tuple[int, ...]:
        return (self.chunk_rows, *self.shape[1:])

    @property
    def shards(self) -> tuple[int, ...] | None:
        return (self.rows_per_file, *self.shape[1:]) if self.rows_per_file != self.chunk_rows else None


@dataclass(frozen=True)
class ShardSpec:
    """A contiguous run of examples: the unit of extraction work and of resume."""

    shard_id: int
    example_start: int
    example_stop: int

    @property
    def num_examples(self) -> int:
        return self.example_stop - self.example_start


@dataclass(frozen=True)
class StoreLayout:
    """Everything that fixes where bytes go in a store. Stored in its attributes; a resume needs the same."""

    layers: tuple[LayerSpec, ...]
    num_examples: int
    max_length: int  # row budget per example in sequence layers
    shard_size: int = 512
    chunk_rows: int = 4096
    dtype: str = "float16"
    codec: str = "blosc-zstd"
    shuffle: str = "byte"
    compression_level: int = 1
    blosc_blocksize: int = 1 << 20
    chunks_per_file: int = 1  # > 1 turns on Zarr's sharding codec: that many chunks per file
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise UniptError(f"unknown storage dtype {self.dtype!r}; choose one of {sorted(STORAGE_DTYPES)}")
        if self.codec not in CODECS or self.shuffle not in SHUFFLES:
            raise UniptError(f"unknown codec {self.codec!r}/{self.shuffle!r}; codecs: {list(CODECS)}")
        if not self.layers:
            raise UniptError("a cache needs at least one layer")
        if self.num_examples <= 0:
            raise UniptError("a cache needs at least one example")
        problem = self.limit_problem()
        if problem:
            raise UniptError(f"the cache layout {problem}; no real cache has that (an edited zarr.json?)")

    def limit_problem(self) -> str | None:
        """Why this layout's numbers cannot be a real cache's (not whole numbers, or past a sane limit)."""
        counts: list[tuple[str, object, int, int]] = [
            ("num_examples", self.num_examples, 1, MAX_EXAMPLES),
            ("max_length", self.max_length, 1, MAX_ROWS_PER_EXAMPLE),
            ("shard_size", self.shard_size, 1, MAX_EXAMPLES),
            ("chunk_rows", self.chunk_rows, 1, MAX_CHUNK_ROWS),
            ("chunks_per_file", self.chunks_per_file, 1, MAX_CHUNKS_PER_FILE),
            ("compression_level", self.compression_level, 0, 22),
            ("blosc_blocksize", self.blosc_blocksize, 0, 2**31 - 1),
            ("the number of layers", len(self.layers), 1, MAX_LAYERS),
        ]
        for spec in self.layers:
            counts += [
                (f"layer {spec.index}'s index", spec.index, 0, MAX_LAYERS),
                (f"layer {spec.index}'s width", spec.width, 1, MAX_WIDTH),
            ]
            if spec.grid is not None:
                if len(spec.grid) != 2:
                    return f"says layer {spec.index}'s grid is {list(spec.grid)}, not [H, W]"
                side = f"layer {spec.index}'s grid side"
                counts += [(side, value, 1, MAX_ROWS_PER_EXAMPLE) for value in spec.grid]
        for name, value, least, most in counts:
            if not _is_count(value) or not least <= value <= most:
                return f"says {name} is {value!r}, not a whole number from {least} to {most}"
        for spec in self.layers:
            if spec.grid is not None and spec.grid[0] * spec.grid[1] > MAX_ROWS_PER_EXAMPLE:
                return (
                    f"says layer {spec.index}'s grid {list(spec.grid)} has over {MAX_ROWS_PER_EXAMPLE} rows"
                )
        shards = -(-self.num_examples // self.shard_size)
        if shards > MAX_SHARDS:
            return f"plans {shards} shards of {self.shard_size} examples, more than {MAX_SHARDS}"
        return None

    @property
    def rows_per_file(self) -> int:
        return self.chunk_rows * max(1, self.chunks_per_file)

    def layer(self, index: int) -> LayerSpec:
        for spec in self.layers:
            if spec.index == index:
                return spec
        raise UniptError(
            f"layer {index} is not in this cache (stored layers: {[s.index for s in self.layers]})"
        )

    def shards(self) -> list[ShardSpec]:
        return [
            ShardSpec(shard_id, start, min(start + self.shard_size, self.num_examples))
            for shard_id, start in enumerate(range(0, self.num_examples, self.shard_size))
        ]

    def rows_per_example(self, spec: LayerSpec) -> int:
        """Row budget per example: the max length for token sequences, H*W (exact) for feature maps."""
        return self.max_length if spec.grid is None else spec.grid[0] * spec.grid[1]

    def _aligned(self, rows: int) -> int:
        unit = self.rows_per_file
        return -(-rows // unit) * unit

    def row_span(self, shard: ShardSpec, spec: LayerSpec) -> tuple[int, int]:
        """(first row, rows reserved) of ``shard`` in layer ``spec``; every span starts on a file boundary."""
        per_example = self.rows_per_example(spec)
        base = shard.shard_id * self._aligned(self.shard_size * per_example)
        return base, self._aligned(shard.num_examples * per_example)

    def total_rows(self, spec: LayerSpec) -> int:
        # The last shard computed, not found in the shard plan: sizing the arrays lists nothing.
        shard_id = (self.num_examples - 1) // self.shard_size
        last = ShardSpec(shard_id, shard_id * self.shard_size, self.num_examples)
        base, capacity = self.row_span(last, spec)
        return base + capacity

    def arrays(self) -> dict[str, ArraySpec]:
        """Every array of a committed store, by name: layers (and int8 scales), then offsets."""
        specs: dict[str, ArraySpec] = {}
        for spec in self.layers:
            rows = self.total_rows(spec)
            specs[layer_array_name(spec.index)] = ArraySpec(
                layer_array_name(spec.index),
                (rows, spec.width),
                STORAGE_DTYPES[self.dtype],
                self.chunk_rows,
                self.rows_per_file,
                spec,
            )
            if has_scale(self.dtype):
                specs[scale_array_name(spec.index)] = ArraySpec(
                    scale_array_name(spec.index),
                    (rows,),
                    np.dtype(np.float32),
                    self.chunk_rows,
                    self.rows_per_file,
                    spec,
                )
        for spec in self.layers:
            if spec.offsets_name not in specs:  # one chunk: read whole, once per reader
                shape = (self.num_examples, 2)
                specs[spec.offsets_name] = ArraySpec(
                    spec.offsets_name, shape, np.dtype(np.int64), self.num_examples, self.num_examples
                )
        return specs

    def offsets(self, spec: LayerSpec, lengths: np.ndarray) -> np.ndarray:
        """[num_examples, 2] row ranges of layer ``spec``: each shard's examples packed from the start
        of its span. ``lengths`` are the token counts (ignored for feature maps: H*W each)."""
        if spec.grid is not None:
            lengths = np.full(self.num_examples, spec.grid[0] * spec.grid[1], dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        offsets = np.zeros((self.num_examples, 2), dtype=np.int64)
        for shard in self.shards():
            part = lengths[shard.example_start : shard.example_stop]
            base, _ = self.row_span(shard, spec)
            starts = base + np.concatenate([[0], np.cumsum(part)[:-1]])
            offsets[shard.example_start : shard.example_stop, 0] = starts
            offsets[shard.example_start : shard.example_stop, 1] = starts + part
        return offsets

    def files_with_rows(self, array: ArraySpec, offsets: np.ndarray) -> set[int]:
        """Indices of the files of ``array`` that hold rows (and so were written): for a layer array,
        every file a shard's used rows touch, given that layer's ``offsets``; for offsets, its one chunk.
        Files in a shard's reserved but unused rows were never written and read as zeros, harmlessly."""
        if array.layer is None:
            return {0}
        files: set[int] = set()
        for first, last in written_ranges(offsets):
            files.update(range(first // array.rows_per_file, (last - 1) // array.rows_per_file + 1))
        return files

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        data["layers"] = [
            {"index": s.index, "width": s.width, "grid": list(s.grid) if s.grid else None}
            for s in self.layers
        ]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoreLayout:
        fields = dict(data)
        fields["layers"] = tuple(
            LayerSpec(int(s["index"]), int(s["width"]), tuple(s["grid"]) if s.get("grid") else None)
            for s in data["layers"]
        )
        return cls(**fields)


def written_ranges(offsets: np.ndarray) -> list[tuple[int, int]]:
    """The row ranges ``(start, stop)`` of a layer that hold rows, in order, given its examples' ``offsets``
    (``[n, 2]``, in row order): the examples' ranges merged where they touch, empty ones left out. A shard's
    examples are packed from the start of its span, so each shard with rows is one range; the rows between
    shards are reserved but never written (reading them is an error)."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, stops = offsets[:, 0], offsets[:, 1]
    kept = stops > starts
    starts, stops = starts[kept], stops[kept]
    if not len(starts):
        return []
    opens = np.ones(len(starts), dtype=bool)  # an example that does not start where the one before stops
    opens[1:] = starts[1:] != stops[:-1]
    firsts = np.flatnonzero(opens)
    lasts = np.append(firsts[1:] - 1, len(starts) - 1)
    return list(zip(starts[firsts].tolist(), stops[lasts].tolist(), strict=True))


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def concat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])``, without a Python loop: the row
    indices of many row ranges at once (a view's gather, the loader's padding scatter)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    # Each position's offset within its range, plus its range's start.
    within = np.arange(total, dtype=np.int64) - np.repeat(ends - counts, counts)
    return np.repeat(np.asarray(starts, dtype=np.int64), counts) + within
