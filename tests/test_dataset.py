"""unipt.train.dataset.CacheDataset: a cache split as a torch IterableDataset, and the docs' own-loop
example."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Extraction, make_sentiment_rows, write_config, write_csv

from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cli.app import main
from unipt.pipeline.config import TrainConfig
from unipt.train.dataset import CacheDataset
from unipt.train.loader import CacheBatches

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"


@pytest.fixture
def tiny_cache(shared_extraction: Extraction) -> str:
    return str(shared_extraction.view)


@pytest.mark.slow
def test_batches_are_the_ones_training_reads_and_each_pass_is_the_next_epoch(tiny_cache: str):
    config = TrainConfig(batch_size=8)
    with open_cache(tiny_cache) as reader, CacheDataset(tiny_cache, "train", config, seed=3) as data:
        training = CacheBatches.for_split(reader, "train", config, 3, shuffle=True)
        for epoch in range(2):
            ours = [b.indices.tolist() for b in data]
            theirs = [b.indices.tolist() for b in training.epoch(epoch)]
            assert ours == theirs
        assert ours != [b.indices.tolist() for b in training.epoch(0)]  # a fresh shuffle per pass
        assert len(data) == len(ours)


@pytest.mark.slow
def test_examples_come_unpadded_with_their_labels(tiny_cache: str):
    with CacheDataset(tiny_cache, "val", per_example=True) as data, open_cache(tiny_cache) as reader:
        examples = list(data)
        assert len(examples) == len(data) == len(reader.split_indices("val"))
        labels = reader.labels()
        offsets = reader.offsets_for(reader.layers[0])
        for (hidden, label), index in zip(examples, reader.split_indices("val"), strict=True):
            assert len(hidden) == len(reader.layers) and hidden[0].dtype == torch.float32
            assert hidden[0].shape[0] == offsets[index, 1] - offsets[index, 0]  # its own tokens, no padding
            assert int(label) == int(labels[index])
        # val is not shuffled: the examples come in the split's order
        assert np.isfinite(torch.cat([h[0] for h, _ in examples]).numpy()).all()


@pytest.mark.slow
def test_several_dataloader_workers_are_refused_in_one_line(tiny_cache: str):
    with CacheDataset(tiny_cache, "train") as data:
        loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2)
        with pytest.raises(Exception, match="num_workers=0"):
            next(iter(loader))


@pytest.mark.e2e  # extracts and trains
@pytest.mark.slow
def test_the_docs_own_loop_example_trains_a_head_well_above_chance(tmp_path, ray_session, capsys):
    """The docs' 20 lines as written, on the real MiniLM: its mean-pooled last layer separates the
    fixture's sentiment words, so a head that trains at all gets most of the test split right."""
    data = write_csv(tmp_path / "data.csv", make_sentiment_rows(300))
    config = write_config(tmp_path / "c.yaml", str(data), "bundled:all-minilm-l6-v2", tmp_path)
    assert main(["extract", str(config), "--no-progress"]) == 0
    (key,) = CacheRoot(tmp_path / "cache").keys()
    cache = str(CacheRoot(tmp_path / "cache").location(key))
    code = re.search(r"## The cache in your own loop.*?```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    code = code.replace('cache = ".unipt/cache/KEY"', f"cache = {cache!r}")
    capsys.readouterr()
    exec(compile(code, str(DOC), "exec"), {})
    accuracy = float(capsys.readouterr().out.split()[-1])
    assert accuracy >= 0.8
