"""Ray extraction with a tiny random BERT: what is cached is exactly what the backbone produced."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from unipt.extract.backbones import HFTextBackbone
from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline import experiment
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.config import load_config
from unipt.pipeline.errors import UniptError

pytestmark = pytest.mark.slow


@pytest.fixture
def prepared(tiny_config):
    return experiment.prepare(load_config(tiny_config))


def test_cache_holds_exactly_what_the_backbone_produced(ray_session, prepared, tiny_bert_dir):
    result = experiment.extract(prepared, progress=False)
    assert not result.cache_hit and result.examples == 240
    reader = open_cache(result.path)
    assert reader.layers == [0, 1, 2]  # embeddings + 2 layers
    assert reader.hidden_sizes == {0: 32, 1: 32, 2: 32}
    assert reader.attrs["dtype"] == "float16" and reader.attrs["key_fields"] == prepared.key_fields

    backbone = HFTextBackbone(BackboneLoadSpec(str(tiny_bert_dir)))
    config = prepared.config
    texts = prepared.dataset.table.column("text").to_pylist()
    # A fresh extraction is one segment of the space, its inputs in the dataset's order (no duplicates
    # here); the view reads through it.
    (segment,) = reader.segments
    shards = segment.layout.shards()
    assert len(shards) == 4 and reader.examples.column("row").to_pylist() == list(range(240))
    for shard in shards:
        encoded = backbone.encode(
            texts[shard.example_start : shard.example_stop],
            reader.layers,
            config.backbone.max_length,
            config.backbone.batch_size,
        )
        for layer in reader.layers:
            rows = [reader.read_example(i, layer) for i in range(shard.example_start, shard.example_stop)]
            np.testing.assert_array_equal(np.concatenate(rows), encoded.layers[layer])  # bit for bit

    # And the cached tokens are the unpadded, single-example forward pass up to fp16 rounding.
    tokens = backbone.tokenizer(texts[5], return_tensors="pt")
    with torch.no_grad():
        states = backbone.model(**tokens, output_hidden_states=True).hidden_states
    for layer in reader.layers:
        np.testing.assert_allclose(
            reader.read_example(5, layer), states[layer][0].numpy(), atol=2e-2, rtol=1e-2
        )


def test_second_extraction_is_a_cache_hit(ray_session, prepared):
    first = experiment.extract(prepared, progress=False)
    t0 = time.perf_counter()
    second = experiment.extract(prepared, progress=False)
    assert second.cache_hit and second.path == first.path
    assert time.perf_counter() - t0 < 2.0  # no worker, no backbone load


def test_layer_subset_and_out_of_range(ray_session, tiny_config):
    subset = experiment.prepare(load_config(tiny_config, ["backbone.layers=[0, 2]"]))
    reader = open_cache(experiment.extract(subset, progress=False).path)
    assert reader.layers == [0, 2]
    wrong = experiment.prepare(load_config(tiny_config, ["backbone.layers=[0, 7]"]))
    with pytest.raises(UniptError, match=r"layers \[7\] out of range"):
        experiment.extract(wrong, progress=False)
    assert not wrong.cache_root.has(wrong.key)


def test_pickle_only_backbone_is_refused_before_any_work(tmp_path, tiny_bert_dir, sentiment_csv):
    import shutil

    from tests.conftest import write_config

    pickled = tmp_path / "pickled-bert"
    shutil.copytree(tiny_bert_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    config = write_config(tmp_path / "c.yaml", str(sentiment_csv), str(pickled), tmp_path)
    with pytest.raises(
        UniptError, match=r"only pickled weights \(pytorch_model.bin\); convert them to safetensors"
    ):
        experiment.prepare(load_config(config))


def test_worker_failure_is_one_clear_error_and_nothing_is_committed(
    ray_session, tmp_path, tiny_bert_dir, sentiment_csv
):
    import shutil

    from tests.conftest import write_config

    broken = tmp_path / "broken-bert"
    shutil.copytree(tiny_bert_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated download
    prep = experiment.prepare(
        load_config(write_config(tmp_path / "c.yaml", str(sentiment_csv), str(broken), tmp_path))
    )
    with pytest.raises(
        UniptError, match="extraction failed in a Ray worker: .+; any finished shards are kept"
    ) as info:
        experiment.extract(prep, progress=False)
    assert "\n" not in str(info.value)
    assert not prep.cache_root.has(prep.key) and prep.cache_root.keys() == []


def test_auto_chunk_rows_shrink_for_wide_layers_and_keep_every_row(ray_session, tmp_path, sentiment_csv):
    from tests.conftest import save_tiny_bert, write_config
    from unipt.pipeline.cache.layout import resolve_chunk_rows

    assert [resolve_chunk_rows("auto", [w]) for w in (32, 384, 768, 1024, 4096, 10**6)] == [
        4096, 4096, 2048, 1024, 256, 256
    ]  # fmt: skip
    assert resolve_chunk_rows(100, [1024]) == 100  # a number is taken as it is
    wide = save_tiny_bert(tmp_path / "wide-bert", hidden_size=768)
    config = write_config(
        tmp_path / "wide.yaml", str(sentiment_csv), str(wide), tmp_path, extract={"chunk_rows": "auto"}
    )
    prepared = experiment.prepare(load_config(config))
    result = experiment.extract(prepared, progress=False)
    reader = open_cache(result.path)
    (segment,) = reader.segments
    assert segment.layout.chunk_rows == 2048 and reader.hidden_sizes[2] == 768
    backbone = HFTextBackbone(BackboneLoadSpec(str(wide)))
    texts = prepared.dataset.table.column("text").to_pylist()
    encoded = backbone.encode(texts[:64], [2], 32, 16)  # the first shard, as the worker encoded it
    rows = np.concatenate([reader.read_example(i, 2) for i in range(64)])
    np.testing.assert_array_equal(rows, encoded.layers[2])
