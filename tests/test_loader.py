"""Streaming batches out of the ragged cache."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.cache import CacheReader, CacheRoot
from tests.conftest import KEY, build_cache
from train.loader import CacheBatches

LENGTHS = [5, 1, 9, 3, 7, 2, 8, 4, 6, 3, 5, 2, 7]
SPLITS = ["train"] * 9 + ["val"] * 4


def _reader(tmp_path):
    tokens, _ = build_cache(CacheRoot(tmp_path), LENGTHS, {0: 4, 1: 4, 2: 6}, shard_size=4, splits=SPLITS)
    return CacheReader(CacheRoot(tmp_path).location(KEY)), tokens


def test_every_example_once_per_epoch_padded_exactly(tmp_path):
    reader, tokens = _reader(tmp_path)
    data = CacheBatches(
        reader, "train", [0, 2], batch_size=4, shuffle=True, seed=3, block_examples=2, shuffle_buffer_blocks=2
    )
    seen = []
    for batch in data.epoch(0):
        assert len(batch.hidden) == 2 and batch.hidden[1].shape[-1] == 6  # only the layers asked for
        for row, index in enumerate(batch.indices):
            n = LENGTHS[index]
            assert batch.mask[row].sum() == n
            for layer, hidden in zip([0, 2], batch.hidden, strict=True):
                np.testing.assert_array_equal(
                    hidden[row, :n].numpy(), tokens[layer][index].astype(np.float32)
                )
                assert torch.all(hidden[row, n:] == 0)
        assert batch.labels.tolist() == [i % 2 for i in batch.indices]
        seen += batch.indices.tolist()
    assert sorted(seen) == list(range(9))
    assert len(list(data.epoch(1))) == len(data) == 3


def test_shuffle_is_seeded_per_epoch_and_evaluation_is_ordered(tmp_path):
    reader, _ = _reader(tmp_path)

    def order(seed: int, epoch: int, shuffle: bool = True) -> list[int]:
        data = CacheBatches(reader, "train", [0], batch_size=3, shuffle=shuffle, seed=seed, block_examples=2)
        return [i for batch in data.epoch(epoch) for i in batch.indices.tolist()]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0, shuffle=False) == list(range(9)) == order(5, 2, shuffle=False)
    val = CacheBatches(reader, "val", [1], batch_size=8)
    assert [b.indices.tolist() for b in val.epoch(0)] == [[9, 10, 11, 12]]
