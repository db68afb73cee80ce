"""The real bundled backbone (all-MiniLM-L6-v2) on a few hundred real Rotten Tomatoes snippets."""

from __future__ import annotations

import numpy as np
import pytest

from unipt.extract.backbones import HFTextBackbone
from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline import experiment
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.config import load_config
from unipt.pipeline.data.table import input_hashes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_minilm_on_rotten_tomatoes(ray_session, tmp_path):
    config = load_config(
        "configs/rt_minilm.yaml",
        [
            "dataset.limit=600",
            "extract.shard_size=128",
            "train.epochs=8",
            "train.lr=3.0e-3",
            f"storage.cache_root={tmp_path / 'cache'}",
            f"storage.runs_root={tmp_path / 'runs'}",
        ],
    )
    prep = experiment.prepare(config)
    result = experiment.extract(prep, progress=False)
    reader = open_cache(result.path)
    assert reader.layers == list(range(7))  # embeddings + 6 transformer layers
    assert set(reader.hidden_sizes.values()) == {384}
    assert reader.num_examples == 600
    assert reader.attrs["backbone"]["model_type"] == "bert"

    backbone = HFTextBackbone(BackboneLoadSpec(prep.primary.identity.local_dir))
    texts = prep.dataset.table.column("text").to_pylist()
    lengths = [len(ids) for ids in backbone.tokenizer(texts, truncation=True, max_length=128)["input_ids"]]
    assert reader.examples.column("length").to_pylist() == lengths
    # The second shard of the segment the view reads, against the backbone run on exactly its inputs in
    # one call, as a worker ran it (same batches, so the same bits).
    (segment,) = reader.segments
    shard = segment.layout.shards()[1]
    text_of = dict(zip(input_hashes(prep.dataset.table), texts, strict=True))
    hashes = segment.examples.column("input_hash").to_pylist()[shard.example_start : shard.example_stop]
    encoded = backbone.encode([text_of[h] for h in hashes], segment.layers, 128, 64)
    for layer in (0, 3, 6):
        cached = np.concatenate(
            [segment.read_example(i, layer) for i in range(shard.example_start, shard.example_stop)]
        )
        np.testing.assert_array_equal(cached, encoded.layers[layer])

    trained = experiment.train(prep, progress=False)
    metrics = trained.metrics
    # 300 examples is a smoke-sized sample: both learn something, neither is measured here.
    assert metrics["probe_test_acc"] > 0.6
    assert metrics["test_acc"] > 0.6
    assert trained.history[-1]["train_loss"] < trained.history[0]["train_loss"]
    assert len(trained.layer_weights) == 6
