"""Streaming batches out of the ragged cache."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest
import torch

from tests.conftest import KEY, build_cache
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.reader import CacheReader
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.config import TrainConfig
from unipt.pipeline.errors import UniptError
from unipt.train.block_plan import budgeted_block_examples
from unipt.train.loader import BUDGETED_PREFETCH_BLOCKS, CacheBatches, to_device, works_in_background

LENGTHS = [5, 1, 9, 3, 7, 2, 8, 4, 6, 3, 5, 2, 7]
SPLITS = ["train"] * 9 + ["val"] * 4


def _reader(tmp_path):
    tokens, _ = build_cache(CacheRoot(tmp_path), LENGTHS, {0: 4, 1: 4, 2: 6}, shard_size=4, splits=SPLITS)
    return open_cache(CacheRoot(tmp_path).location(KEY)), tokens


def test_every_example_once_per_epoch_padded_exactly(tmp_path):
    reader, tokens = _reader(tmp_path)
    data = CacheBatches(
        reader, "train", [0, 2], batch_size=4, shuffle=True, seed=3, block_examples=2,
        shuffle_buffer_blocks=2, return_freed_memory=True,  # pages handed back between batches: same values
    )  # fmt: skip
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


def _batches(reader, epoch: int, **options) -> list[list[int]]:
    data = CacheBatches(
        reader, "train", [0, 2], 2, shuffle=True, seed=7, block_examples=2, shuffle_buffer_blocks=2, **options
    )
    return [batch.indices.tolist() for batch in data.epoch(epoch)]


def test_without_length_grouping_the_batches_are_those_of_the_loader_before_it(tmp_path):
    reader, _ = _reader(tmp_path)
    # Pinned: what the loader gave for this seed before length grouping and concurrent reads existed.
    before = [[[4, 5], [1, 0], [8, 3], [2, 7], [6]], [[0, 6], [7, 1], [5, 4], [2, 3], [8]]]
    assert [_batches(reader, e, length_grouping=False) for e in (0, 1)] == before
    assert [_batches(reader, e, length_grouping=False, reader_threads=1) for e in (0, 1)] == before
    assert [_batches(reader, e, length_grouping=False, return_freed_memory=True) for e in (0, 1)] == before


def test_length_grouping_batches_similar_lengths_in_a_fresh_seeded_order(tmp_path):
    reader, tokens = _reader(tmp_path)
    grouped = [_batches(reader, e, length_grouping=True) for e in range(4)]
    assert grouped[0] == _batches(reader, 0, length_grouping=True)  # seeded
    assert len({str(g) for g in grouped}) > 1  # a fresh order each epoch
    for batches in grouped:
        assert sorted(i for b in batches for i in b) == list(range(9))  # every example once
        assert len(batches) == 5 and [len(b) for b in batches[:-1]] == [2] * 4  # the same batch count

    def padded_tokens(batches: list[list[int]]) -> int:
        return sum(len(b) * max(LENGTHS[i] for i in b) for b in batches)

    plain = [_batches(reader, e, length_grouping=False) for e in range(4)]
    assert sum(map(padded_tokens, grouped)) < sum(map(padded_tokens, plain))

    # Grouped batches are padded exactly like any other.
    data = CacheBatches(
        reader, "train", [0, 2], batch_size=3, shuffle=True, seed=1, block_examples=2, length_grouping=True
    )
    for batch in data.epoch(0):
        for row, index in enumerate(batch.indices):
            n = LENGTHS[index]
            assert batch.mask[row].sum() == n and torch.all(batch.hidden[0][row, n:] == 0)
            np.testing.assert_array_equal(
                batch.hidden[1][row, :n].numpy(), tokens[2][index].astype(np.float32)
            )


def test_length_grouping_is_for_training_only(tmp_path):
    from unipt.pipeline.config import TrainConfig

    reader, _ = _reader(tmp_path)
    config = TrainConfig(batch_size=2, block_examples=2, length_grouping=True)
    assert CacheBatches.for_split(reader, "train", config, seed=0, shuffle=True).length_grouping
    assert not CacheBatches.for_split(reader, "val", config, seed=0, shuffle=False).length_grouping


def test_to_device_upcasts_half_precision_batches():
    from unipt.train.loader import Batch, to_device

    half = torch.tensor([[[0.5, -1.25]]], dtype=torch.float16)
    batch = Batch([half], torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, dtype=torch.long), np.zeros(1))
    (hidden,), mask = to_device(batch, torch.device("cpu"))
    assert hidden.dtype == torch.float32 and hidden.tolist() == [[[0.5, -1.25]]] and mask.all()


def test_float16_batches_are_upcast_exactly_in_pieces_and_float32_ones_are_not_copied():
    from unipt.train.padding import as_float32

    # 300 rows of 384: several of the serial pieces the cast is cut into, the last one partial.
    half = np.random.default_rng(0).standard_normal((3, 100, 384)).astype(np.float16)
    half[0, 0, :3] = [np.inf, -0.0, np.float16(6e-8)]  # infinities, signed zero, a subnormal survive
    out = as_float32(half)
    assert out.dtype == torch.float32 and out.shape == (3, 100, 384)
    assert np.array_equal(out.numpy(), half.astype(np.float32))
    assert np.signbit(out[0, 0, 1].item())
    single = np.ones((2, 5, 4), dtype=np.float32)
    assert as_float32(single).data_ptr() == single.ctypes.data  # already float32: shared, not copied


def test_cpu_training_reads_between_steps_and_gives_the_batches_of_the_background_loader(tmp_path):
    reader, _ = _reader(tmp_path)
    threads_before = {t.name for t in threading.enumerate()}
    made = {}
    for setting in ("auto", False, True):  # the background one last: its threads outlive its epoch briefly
        config = TrainConfig(batch_size=2, block_examples=2, loader_background=setting, device="cpu")
        data = CacheBatches.for_split(reader, "train", config, seed=0, shuffle=True)
        seen = []
        for batch in data.epoch(1):
            seen.append(batch)
            if setting != True:  # noqa: E712  (auto and False)
                # Nothing reads or pads ahead of the training thread: no loader thread is alive.
                alive = {t.name for t in threading.enumerate()} - threads_before
                assert not any(name.startswith(("cache-prefetch", "cache-collate")) for name in alive)
        made[setting] = seen
        assert (data.prefetch_blocks > 0) is (setting is True), setting
    for inline, ahead in zip(made["auto"], made[True], strict=True):
        assert inline.indices.tolist() == ahead.indices.tolist() and torch.equal(inline.mask, ahead.mask)
        assert all(torch.equal(a, b) for a, b in zip(inline.hidden, ahead.hidden, strict=True))
    # A GPU gets the background loader (the device is all "auto" looks at).
    assert works_in_background("auto", torch.device("cuda"))
    assert not works_in_background("auto", torch.device("cpu"))


def test_kept_decoded_blocks_serve_later_epochs_within_their_budget(tmp_path):
    reader, _ = _reader(tmp_path)
    reads = []

    def counting(data):
        read = data._read_block
        data._read_block = lambda indices, view=0: reads.append(int(indices[0])) or read(indices, view)
        return data

    plain = CacheBatches.for_split(reader, "train", TrainConfig(batch_size=2, block_examples=2), 0, True)
    kept = counting(
        CacheBatches.for_split(
            reader, "train", TrainConfig(batch_size=2, block_examples=2, keep_decoded_mb=1), 0, True
        )
    )
    for epoch in range(3):
        for a, b in zip(plain.epoch(epoch), kept.epoch(epoch), strict=True):
            assert a.indices.tolist() == b.indices.tolist() and torch.equal(a.mask, b.mask)
            assert all(torch.equal(x, y) for x, y in zip(a.hidden, b.hidden, strict=True))
        if epoch == 0:
            assert sorted(reads) == [int(block[0]) for block in kept.blocks]
    assert len(reads) == len(kept.blocks)  # epochs 1 and 2 read nothing
    assert 0 < kept._kept_bytes <= 2**20
    # A budget smaller than every block keeps none of them: each epoch reads every block again.
    reads.clear()
    tiny = counting(CacheBatches(reader, "train", reader.layers, 2, shuffle=True, block_examples=2))
    tiny.keep_decoded_bytes = 1
    for epoch in range(2):
        list(tiny.epoch(epoch))
    assert len(reads) == 2 * len(tiny.blocks) and tiny._kept_bytes == 0
    # One budget, spent on the training split: evaluation splits keep nothing.
    config = TrainConfig(batch_size=2, block_examples=2, keep_decoded_mb=1)
    assert CacheBatches.for_split(reader, "val", config, 0, False).keep_decoded_bytes == 0


def test_auto_keeps_a_split_that_fits_the_loader_budget_when_a_later_epoch_will_use_it(tmp_path):
    reader, _ = _reader(tmp_path)

    def kept(**settings):
        config = TrainConfig(batch_size=2, block_examples=2, **settings)
        return CacheBatches.for_split(reader, "train", config, 0, True).keep_decoded_bytes

    data = CacheBatches.for_split(reader, "train", TrainConfig(batch_size=2, block_examples=2), 0, True)
    # The 9 train examples' fp16 rows, layers of widths 4, 4 and 6.
    assert data.decoded_bytes() == sum(LENGTHS[:9]) * (4 + 4 + 6) * 2
    assert kept(epochs=3, loader_memory_mb=1) == 2**20  # fits: the whole split is kept
    assert kept(epochs=1, loader_memory_mb=1) == 0  # no later epoch to use it
    assert kept(epochs=3, loader_memory_mb=None) == 0  # runs made before the budget existed
    assert kept(epochs=3, keep_decoded_mb=0) == 0 and kept(epochs=1, keep_decoded_mb=5) == 5 * 2**20
    big = _dtype_reader(tmp_path, "float16")
    config = TrainConfig(batch_size=2, block_examples=2, epochs=3, loader_memory_mb=1)
    split = CacheBatches.for_split(big, "train", config, 0, True)
    split.indices = np.repeat(split.indices, 10_000)  # as if the split were 10,000 times larger (> 1 MiB)
    assert split.decoded_bytes() > 2**20 and split.kept_bytes_for(config) == 0
    split.indices = split.indices[:3]
    assert split.kept_bytes_for(config) == 2**20
    split.num_views = 2  # each epoch would read another augmented view: keeping one helps no epoch after
    assert split.kept_bytes_for(config) == 0


def _dtype_reader(tmp_path, dtype: str, codec: str = "blosc-zstd") -> CacheReader:
    root = CacheRoot(tmp_path / dtype)
    build_cache(root, LENGTHS, {0: 4, 1: 4, 2: 6}, shard_size=4, splits=SPLITS, dtype=dtype, codec=codec)
    return open_cache(root.location(KEY))


# codec none: 16-bit rows are read as views into the chunk files' maps (bfloat16 as its stored bits).
@pytest.mark.parametrize("codec", ["blosc-zstd", "none"])
def test_training_batches_keep_16_bit_rows_and_upcast_in_to_device_to_the_float32_batches(tmp_path, codec):
    config = TrainConfig(batch_size=4, block_examples=2)
    for dtype, kept in (("float16", torch.float16), ("bfloat16", torch.bfloat16), ("int8", torch.float32)):
        reader = _dtype_reader(tmp_path, dtype, codec)
        training = CacheBatches.for_split(reader, "train", config, seed=0, shuffle=True)
        # Readers that take batches as they are (probe, prediction) get float32 from the collate thread.
        plain = CacheBatches(
            reader, "train", reader.layers, 4, shuffle=True, seed=0, block_examples=2, length_grouping=True
        )
        assert len(training.blocks) == len(plain.blocks)
        assert all(map(np.array_equal, training.blocks, plain.blocks))
        for kept_batch, float_batch in zip(training.epoch(1), plain.epoch(1), strict=True):
            assert [h.dtype for h in kept_batch.hidden] == [kept] * 3, dtype
            assert [h.dtype for h in float_batch.hidden] == [torch.float32] * 3
            hidden, mask = to_device(kept_batch, torch.device("cpu"))
            assert torch.equal(mask, float_batch.mask)
            for upcast, direct in zip(hidden, float_batch.hidden, strict=True):
                assert upcast.dtype == torch.float32 and torch.equal(upcast, direct), dtype


def test_blocks_shrink_to_the_loader_memory_budget(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, LENGTHS, {0: 4096, 1: 4096}, shard_size=4, splits=SPLITS, codec="none")
    reader = open_cache(root.location(KEY))
    values = float(np.mean(LENGTHS[:9])) * 8192  # 9 train examples x both layers' widths
    held = BUDGETED_PREFETCH_BLOCKS + 1 + 1  # budgeted queue, a shuffle window of 1 block, the block read
    expected = int(2**20 // (held * values * 2))
    assert 1 <= expected < 8
    assert budgeted_block_examples(8, values, 1, held) == expected
    assert budgeted_block_examples(8, values, None, held) == 8  # no cap: the configured size
    assert budgeted_block_examples(8, values, 10**6, held) == 8  # a cap far above: unchanged
    assert budgeted_block_examples(8, 1e12, 1, held) == 1  # one example over the cap: blocks of one

    capped = CacheBatches(
        reader, "train", [0, 1], 2, shuffle=True, block_examples=8, shuffle_buffer_blocks=1, memory_mb=1
    )
    free = CacheBatches(reader, "train", [0, 1], 2, shuffle=True, block_examples=8, shuffle_buffer_blocks=1)
    assert max(len(b) for b in capped.blocks) == expected < max(len(b) for b in free.blocks)
    assert sorted(i for b in capped.epoch(0) for i in b.indices.tolist()) == list(range(9))


@pytest.mark.slow
def test_examples_carried_to_the_next_window_do_not_keep_their_blocks_alive(tmp_path):
    # One long example per block, longer block after block: with grouping, each window's longest examples
    # wait for the next window, window after window, each from another block.
    lengths = [length for k in range(20) for length in (20 + k, 1)]
    root = CacheRoot(tmp_path)
    build_cache(root, lengths, {0: 4, 1: 4}, shard_size=8, splits=["train"] * 40)
    reader = open_cache(root.location(KEY))
    data = CacheBatches(
        reader, "train", [0, 1], 12, shuffle=True, seed=0, block_examples=2, shuffle_buffer_blocks=2,
        prefetch_blocks=1, length_grouping=True,
    )  # fmt: skip
    alive: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
    read = data._read_block

    def tracked(indices, view=0):
        items = read(indices, view)
        alive[id(items[0][0])] = items[0][0]
        return items

    data._read_block = tracked
    most = 0
    seen = []
    for batch in data.epoch(0):
        gc.collect()
        most = max(most, len(alive))
        seen += batch.indices.tolist()
    assert sorted(seen) == list(range(40))
    # The window (2 blocks), the prefetch queue (1) and the block being read, plus one in hand: never more.
    assert most <= 5, most


def test_rows_read_as_views_into_the_maps_give_the_batches_of_copied_reads(tmp_path):
    # chunk_rows 8: most blocks span several chunk files and several examples straddle two of them.
    made = {
        codec: build_cache(
            CacheRoot(tmp_path / codec), LENGTHS, {0: 4, 1: 4, 2: 6}, shard_size=4, splits=SPLITS, codec=codec
        )[0]
        for codec in ("none", "blosc-zstd")
    }
    mapped = open_cache(CacheRoot(tmp_path / "none").location(KEY))
    packed = open_cache(CacheRoot(tmp_path / "blosc-zstd").location(KEY))
    pieces = mapped.stored_pieces("layer_00", 3, 18)
    assert [first for first, _ in pieces] == [3, 8, 16]  # rows 0-17 hold the first shard
    assert all(not rows.flags.writeable and not rows.flags.owndata for _, rows in pieces)  # views, no copy
    np.testing.assert_array_equal(np.concatenate([rows for _, rows in pieces]), mapped.read_rows(0, 3, 18))
    assert len(packed.stored_pieces("layer_00", 3, 18)) == 1  # a compressed store reads as before
    tokens = made["none"]
    for keep_dtype in (False, True):
        views, copies = (
            CacheBatches(
                reader,
                "train",
                [0, 2],
                batch_size=3,
                shuffle=True,
                seed=1,
                block_examples=4,
                shuffle_buffer_blocks=2,
                length_grouping=True,
                keep_dtype=keep_dtype,
            )  # fmt: skip
            for reader in (mapped, packed)
        )
        for epoch in range(2):
            for a, b in zip(views.epoch(epoch), copies.epoch(epoch), strict=True):
                assert a.indices.tolist() == b.indices.tolist() and torch.equal(a.mask, b.mask)
                for layer, x, y in zip((0, 2), a.hidden, b.hidden, strict=True):
                    assert x.dtype == y.dtype == (torch.float16 if keep_dtype else torch.float32)
                    assert torch.equal(x, y)
                    for row, index in enumerate(a.indices):
                        n = LENGTHS[index]
                        assert np.array_equal(
                            x[row, :n].numpy(), tokens[layer][index].astype(x.numpy().dtype)
                        )
                        assert not x[row, n:].any()


def test_a_damaged_chunk_read_through_the_maps_stops_the_loader_with_one_clear_error(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, LENGTHS, {0: 4}, shard_size=4, splits=SPLITS, codec="none")
    chunk = tmp_path / KEY / "layer_00" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0x04
    chunk.write_bytes(bytes(data))
    loader = CacheBatches(open_cache(root.location(KEY)), "train", [0], batch_size=4, block_examples=4)
    with pytest.raises(
        UniptError, match=r"layer_00 chunk 1 \(rows 8-15\): its crc32c checksum does not match"
    ):
        list(loader.epoch(0))
