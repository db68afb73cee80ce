"""What an extraction is asked to build, and what it gave."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline.cache.locks import ReadLease
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.config import BackboneConfig, ExtractConfig
from unipt.pipeline.storage import Location


@dataclass
class ExtractionRequest:
    key: str
    key_fields: dict[str, Any]
    cache_root: CacheRoot
    examples: pa.Table  # example_id, text, label, split
    label_names: list[str]
    load_spec: BackboneLoadSpec
    backbone: BackboneConfig
    extract: ExtractConfig
    backbone_name: str = ""


@dataclass
class ExtractionResult:
    """What one extraction (or cache hit) gave. It holds a read lease on the cache, taken before the
    build lock was let go (or, on a hit, before the cache was found), so `unipt cache gc` cannot remove
    the cache between here and training. Release it when done reading: ``result.release()``, or use the
    result as a context manager (``with run_extraction(...) as result: train(...)``)."""

    path: Location
    cache_hit: bool
    seconds: float = 0.0
    examples: int = 0
    tokens: int = 0
    bytes_written: int = 0
    shards_run: int = 0
    shards_resumed: int = 0
    workers: int = 0  # the actors started (extract.workers, cut to what the cluster could place)
    workers_used: int = 0  # of those, the ones that finished at least one shard
    workers_lost: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    lease: ReadLease | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """Let `unipt cache gc` remove this cache again (once no other reader holds it)."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def __enter__(self) -> ExtractionResult:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
