"""A cache split as a ``torch.utils.data.IterableDataset``, for training loops of your own.

Batch mode gives exactly the batches ``unipt train`` reads (the loader's block plan, shuffle window and
length grouping, for a given seed and epoch); example mode gives one example at a time, for a
``DataLoader`` with a ``collate_fn`` of your own. The dataset reads ahead itself, so use it with
``num_workers=0`` (several workers would each read the whole split)::

    with CacheDataset(".unipt/cache/KEY", "train", TrainConfig(batch_size=32), shuffle=True) as data:
        for epoch in range(3):
            for batch in data:  # a new shuffle each pass
                logits = head(batch.hidden[-1].float().mean(1))
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.config import TrainConfig
from unipt.pipeline.errors import UniptError
from unipt.train.loader import Batch, CacheBatches


class CacheDataset(torch.utils.data.IterableDataset):
    """One split of a cache; each ``iter()`` is the next epoch.

    ``cache`` is a path or URL (opened here, closed by :meth:`close` or ``with``) or an open reader (left
    to its owner). ``per_example=True`` yields ``(hidden, label)`` per example: a list of ``[tokens, width]``
    float32 tensors (one per layer, no padding) and the label tensor.
    """

    def __init__(
        self,
        cache: str | Path | ActivationCache,
        split: str = "train",
        config: TrainConfig | None = None,
        *,
        shuffle: bool | None = None,
        seed: int = 0,
        layers: list[int] | None = None,
        per_example: bool = False,
    ) -> None:
        super().__init__()
        self._owned = not isinstance(cache, ActivationCache)
        self.reader = open_cache(cache) if self._owned else cache
        config = config or TrainConfig()
        shuffle = split == "train" if shuffle is None else shuffle
        self.batches = CacheBatches.for_split(self.reader, split, config, seed, shuffle, layers)
        self.per_example = per_example
        self.epoch = 0

    def __iter__(self) -> Iterator[Batch] | Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise UniptError(
                "CacheDataset reads ahead itself; give the DataLoader num_workers=0 (each worker would "
                "read the whole split)"
            )
        epoch, self.epoch = self.epoch, self.epoch + 1
        batches = self.batches.epoch(epoch)
        return self._examples(batches) if self.per_example else batches

    def __len__(self) -> int:
        """Batches per epoch (examples, with per_example)."""
        return len(self.batches.indices) if self.per_example else len(self.batches)

    def _examples(self, batches: Iterator[Batch]) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        for batch in batches:
            lengths = batch.mask.sum(1).tolist()
            for row, length in enumerate(lengths):
                # Feature maps have no padding to cut: each stage is [C, H, W] as stored.
                hidden = [h[row] if self.batches.maps else h[row, :length] for h in batch.hidden]
                yield [h.float() for h in hidden], batch.labels[row]

    def close(self) -> None:
        self.batches.close()
        if self._owned:
            self.reader.close()

    def __enter__(self) -> CacheDataset:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
