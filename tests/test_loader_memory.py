"""Streaming a cache larger than the memory it may use: peak RSS grows with the block size, not the cache."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import KEY, example_table
from unipt.pipeline.cache.layout import LayerSpec, StoreLayout
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cache.writer import CacheBuilder, write_shard

EXAMPLES, TOKENS, WIDTH = 7000, 32, 384  # two fp16 layers: 7000 * 32 * 384 * 2 B * 2 = 344 MB
MiB = 2**20

# Runs in a fresh interpreter so that nothing the test process allocated counts. The baseline is taken
# after imports, opening the cache and reading one batch (Zarr's and torch's one-off allocations); the peak
# is the process's own memory sampled at every batch (the loader holds its blocks and batches across them).
EPOCH = """
import json, resource, sys
from unipt.pipeline.cache.opener import open_cache
from unipt.train.loader import CacheBatches

def private_mib():
    # Memory the process holds itself (RssAnon). Pages of the chunk files it reads through memory maps count
    # in its RSS too, but they are the page cache's, shared with every reader and dropped under pressure.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

data = CacheBatches(open_cache(sys.argv[1]), "train", [0, 1], batch_size=64, shuffle=True, seed=0,
                    block_examples=64, shuffle_buffer_blocks=4)
batches = data.epoch(0)
seen = len(next(batches).indices)
baseline, most = private_mib(), 0.0
for batch in batches:
    seen += len(batch.indices)
    most = max(most, private_mib())  # with the batch in hand, and the blocks and the batch ahead held
print(json.dumps({"baseline_mib": baseline, "peak_mib": most, "peak_rss_mib": peak_mib(), "examples": seen}))
"""


def _write_large_cache(root: CacheRoot) -> int:
    layout = StoreLayout(
        layers=(LayerSpec(0, WIDTH), LayerSpec(1, WIDTH)),
        num_examples=EXAMPLES,
        max_length=TOKENS,
        shard_size=500,
        codec="none",  # incompressible-sized on disk: the cache really is this big
    )
    builder = CacheBuilder(root, KEY)
    builder.create(layout, {"label_names": ["a", "b"], "key_fields": {}})
    rows = (
        np.random.default_rng(0).standard_normal((500 * TOKENS, WIDTH), dtype=np.float32).astype(np.float16)
    )
    for shard in layout.shards():
        part = rows[: shard.num_examples * TOKENS]
        write_shard(builder.location, layout, shard, {0: part, 1: part}, [TOKENS] * shard.num_examples)
    return builder.commit(layout, example_table(EXAMPLES), {}).size()


@pytest.mark.slow
def test_an_epoch_over_a_large_cache_stays_far_below_its_size(tmp_path):
    root = CacheRoot(tmp_path)
    cache_bytes = _write_large_cache(root)
    assert cache_bytes > 300 * MiB

    result = subprocess.run(
        [sys.executable, "-c", EPOCH, str(root.location(KEY))], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["examples"] == EXAMPLES
    growth = measured["peak_mib"] - measured["baseline_mib"]
    # What is held at once: the prefetch queue plus the shuffle window, each a block of 64 examples
    # (3 MiB here), and a batch: tens of MiB, whatever the cache's size.
    assert growth < cache_bytes / MiB / 4, (growth, cache_bytes / MiB, measured)
