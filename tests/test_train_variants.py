"""Training each UniPT variant from a cache: feature maps out of the loader, the variant/cache checks,
and end to end on real caches (EfficientNet-Lite0 stages of MNIST digits; a tiny BERT on sentences)."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch

from tests.conftest import KEY, Extraction, build_cache, example_table, write_config
from unipt.pipeline import experiment
from unipt.pipeline.cache.layout import LayerSpec, StoreLayout
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.reader import CacheReader
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cache.writer import CacheBuilder, write_shard
from unipt.pipeline.config import TrainConfig, load_config
from unipt.pipeline.errors import UniptError
from unipt.train.loader import CacheBatches
from unipt.train.methods import build_model
from unipt.train.methods.unipt import VARIANTS
from unipt.train.methods.unipt.clip4clip import UniPTClip4ClipClassifier
from unipt.train.methods.unipt.cnn import UniPTCNNClassifier
from unipt.train.methods.unipt.transformer import UniPTClassifier
from unipt.train.probe import linear_probe, pooled_features
from unipt.train.tasks import train_task

# Three stages at strides 4, 2, 1 relative to the last; 40-row chunks leave gaps between shards.
STAGES = (LayerSpec(0, 3, grid=(8, 8)), LayerSpec(2, 5, grid=(4, 4)), LayerSpec(4, 6, grid=(2, 2)))
SPLITS = ["train"] * 6 + ["val"] * 2 + ["test"] * 2


def build_map_cache(root: CacheRoot, specs=STAGES, n: int = 10) -> dict[int, np.ndarray]:
    """A committed cache of random fp16 feature maps; returns them as {layer: [n, H, W, C]}."""
    rng = np.random.default_rng(0)
    layout = StoreLayout(specs, num_examples=n, max_length=1, shard_size=3, chunk_rows=40)
    maps = {s.index: rng.standard_normal((n, *s.grid, s.width)).astype(np.float16) for s in specs}
    builder = CacheBuilder(root, KEY)
    builder.create(layout, {"label_names": ["a", "b"]})
    for shard in layout.shards():
        part = slice(shard.example_start, shard.example_stop)
        write_shard(
            builder.location,
            layout,
            shard,
            {s.index: maps[s.index][part].reshape(-1, s.width) for s in specs},
        )
    builder.commit(layout, example_table(n, SPLITS[:n]), {})
    return maps


@pytest.fixture
def map_cache(tmp_path) -> tuple[CacheReader, dict[int, np.ndarray]]:
    maps = build_map_cache(CacheRoot(tmp_path))
    return open_cache(CacheRoot(tmp_path).location(KEY)), maps


def test_loader_gives_each_stage_as_exact_maps(map_cache):
    reader, maps = map_cache
    offsets = {s.index: reader.offsets_for(s.index) for s in STAGES}
    assert not np.array_equal(offsets[0], offsets[4])  # stages really do sit at different rows
    data = CacheBatches(reader, "train", [0, 2, 4], batch_size=4, shuffle=True, seed=1, block_examples=2)
    seen = []
    for batch in data.epoch(0):
        assert [tuple(h.shape[1:]) for h in batch.hidden] == [(3, 8, 8), (5, 4, 4), (6, 2, 2)]
        assert batch.mask.shape == (len(batch.indices), 4) and bool(batch.mask.all())
        for layer, h in zip([0, 2, 4], batch.hidden, strict=True):
            assert h.dtype == torch.float32
            want = maps[layer][batch.indices].astype(np.float32).transpose(0, 3, 1, 2)  # [B, C, H, W]
            np.testing.assert_array_equal(h.numpy(), want)
        np.testing.assert_array_equal(batch.labels.numpy(), batch.indices % 2)
        seen += batch.indices.tolist()
    assert sorted(seen) == list(range(6)) and seen != list(range(6))  # each once, shuffled

    only_last = next(CacheBatches(reader, "test", [4], batch_size=8).epoch(0))
    np.testing.assert_array_equal(only_last.indices, [8, 9])
    np.testing.assert_array_equal(
        only_last.hidden[0].numpy(), maps[4][8:].astype(np.float32).transpose(0, 3, 1, 2)
    )


def test_build_model_picks_the_variant_and_refuses_the_wrong_cache(tmp_path, map_cache):
    reader, _ = map_cache
    assert isinstance(build_model(reader, TrainConfig(variant="cnn")), UniPTCNNClassifier)
    for variant in ("transformer", "clip4clip"):
        with pytest.raises(UniptError, match="holds CNN feature maps; set train.variant: cnn"):
            build_model(reader, TrainConfig(variant=variant))

    build_cache(CacheRoot(tmp_path / "tokens"), [3, 5, 4, 2], {0: 8, 1: 8, 2: 8})
    tokens = open_cache(CacheRoot(tmp_path / "tokens").location(KEY))
    assert type(build_model(tokens, TrainConfig())) is UniPTClassifier
    assert isinstance(build_model(tokens, TrainConfig(variant="clip4clip")), UniPTClip4ClipClassifier)
    with pytest.raises(UniptError, match="holds token sequences; set train.variant: transformer"):
        build_model(tokens, TrainConfig(variant="cnn"))
    with pytest.raises(UniptError, match=r"its width is that layer's \(8\); remove train.embed_size"):
        build_model(tokens, TrainConfig(variant="clip4clip", embed_size=16))
    with pytest.raises(UniptError, match="unknown train.variant 'lstm'"):
        build_model(tokens, TrainConfig().model_copy(update={"variant": "lstm"}))


def test_the_config_offers_exactly_the_variants_the_package_builds():
    assert typing.get_args(TrainConfig.model_fields["variant"].annotation) == tuple(VARIANTS)


def test_cnn_variant_refuses_stages_whose_grids_do_not_divide(tmp_path):
    specs = (LayerSpec(3, 4, grid=(6, 6)), LayerSpec(5, 4, grid=(4, 4)))
    build_map_cache(CacheRoot(tmp_path), specs, n=4)
    reader = open_cache(CacheRoot(tmp_path).location(KEY))
    with pytest.raises(
        UniptError, match=r"layer: grid 3: 6x6, 5: 4x4\): every grid must be an integer multiple"
    ):
        train_task(reader, TrainConfig(variant="cnn", epochs=1), seed=0, progress=False)


def test_the_cnn_refusal_suggests_stages_that_fit(tmp_path):
    """EfficientNet-Lite0 on MNIST with every stage (grids 56, 56, 28, 14, 7, 7, 4, 4, 4, as extracted): 7
    is no multiple of 4, and the refusal names the stages that do fit, keeping the last (deepest) one."""
    grids = [56, 56, 28, 14, 7, 7, 4, 4, 4]
    specs = tuple(LayerSpec(i, 2, grid=(g, g)) for i, g in enumerate(grids))
    build_map_cache(CacheRoot(tmp_path), specs, n=2)
    reader = open_cache(CacheRoot(tmp_path).location(KEY))
    with pytest.raises(UniptError, match=r"pick other backbone.layers, e\.g\. \[0, 1, 2, 6, 7, 8\] \(every"):
        train_task(reader, TrainConfig(variant="cnn", epochs=1), seed=0, progress=False)
    # The suggestion trains.
    fitting = tuple(spec for spec in specs if spec.index in (0, 1, 2, 6, 7, 8))
    build_map_cache(CacheRoot(tmp_path / "fit"), fitting, n=2)
    fit_reader = open_cache(CacheRoot(tmp_path / "fit").location(KEY))
    config = TrainConfig(variant="cnn", epochs=1, batch_size=2)
    trained = train_task(fit_reader, config, seed=0, progress=False)
    assert len(trained.history) == 1 and math.isfinite(trained.history[0]["train_loss"])
    assert isinstance(trained.model, UniPTCNNClassifier)


@pytest.mark.slow
def test_training_each_variant_on_small_synthetic_caches(tmp_path, map_cache):
    reader, _ = map_cache
    cnn = train_task(
        reader, TrainConfig(variant="cnn", epochs=2, batch_size=3, embed_size=8), seed=0, progress=False
    )
    assert len(cnn.history) == 2 and len(cnn.layer_weights) == 2
    assert math.isclose(sum(cnn.layer_weights), 1.0, rel_tol=1e-5)

    build_cache(
        CacheRoot(tmp_path / "tokens"), [4, 6, 3, 5, 7, 2, 6, 5, 4, 3], {0: 8, 1: 8, 2: 8}, splits=SPLITS
    )
    tokens = open_cache(CacheRoot(tmp_path / "tokens").location(KEY))
    config = TrainConfig(variant="clip4clip", epochs=2, batch_size=4)
    one, two = (train_task(tokens, config, seed=3, progress=False) for _ in range(2))
    assert len(one.layer_weights) == 2 and one.layer_weights == two.layer_weights
    assert [h["train_loss"] for h in one.history] == [h["train_loss"] for h in two.history]
    # clip4clip's extra parameters: each layer's ReLU->Linear (no LayerNorm) plus the anchor's own one.
    d = 4
    expected = 3 * (8 * d + d) + (d + 1) + (d * 8 + 8) + (8 * 2 + 2)
    assert one.metrics["trainable_params"] == expected


# --- real backbones, through the real extraction path ------------------------------------------------------


@pytest.mark.e2e  # extracts and trains
@pytest.mark.slow
def test_cnn_variant_trains_from_a_real_efficientnet_cache(ray_session, tmp_path):
    """EfficientNet-Lite0 stages 1, 2, 3, 5 of 96 MNIST digits: grids 56/28/14/7, ratios 8/4/2 (as C2-C5)."""
    path = write_config(
        tmp_path / "cnn.yaml",
        "bundled:mnist_5k",
        "bundled:efficientnet-lite0",
        tmp_path,
        dataset={"source": "bundled:mnist_5k", "id_column": None, "limit": 96},
        backbone={"name_or_path": "bundled:efficientnet-lite0", "batch_size": 32, "layers": [1, 2, 3, 5]},
        extract={"shard_size": 32, "chunk_rows": 4096},
        train={"variant": "cnn", "epochs": 2, "batch_size": 16, "probe_baseline": False},
    )
    config = load_config(path)
    prep = experiment.prepare(config)
    reader = open_cache(experiment.extract(prep, progress=False).path)
    assert [tuple(reader.layer_spec(layer).grid) for layer in reader.layers] == [
        (56, 56),
        (28, 28),
        (14, 14),
        (7, 7),
    ]

    # The loader's maps are the cached [H, W, C] maps, channels first.
    batch = next(CacheBatches(reader, "train", reader.layers, batch_size=4).epoch(0))
    for layer, maps in zip(reader.layers, batch.hidden, strict=True):
        for row, index in enumerate(batch.indices):
            want = reader.read_example(int(index), layer).astype(np.float32).transpose(2, 0, 1)
            np.testing.assert_array_equal(maps[row].numpy(), want)

    result = train_task(reader, config.train, seed=0, progress=False)
    assert len(result.history) == 2 and all(math.isfinite(h["train_loss"]) for h in result.history)
    assert 0.0 <= result.metrics["test_acc"] <= 1.0 and 0.0 <= result.metrics["val_acc"] <= 1.0
    assert len(result.layer_weights) == 3  # one per non-anchor stage
    assert math.isclose(sum(result.layer_weights), 1.0, rel_tol=1e-5)
    assert result.metrics["trainable_params"] > 0

    with pytest.raises(UniptError, match="set train.variant: cnn"):
        train_task(reader, TrainConfig(epochs=1), seed=0, progress=False)
    # model.json of an image model names no text column (the config's text_column is only its default).
    assert experiment.model_spec(prep, reader).columns == {"label": "label"}

    # The linear probe pools the last stage's map over its positions.
    features, labels = pooled_features(reader, "train", reader.layers[-1])
    first = int(reader.split_indices("train")[0])
    want = reader.read_example(first, reader.layers[-1]).astype(np.float32).mean(axis=(0, 1))
    assert features.shape == (len(reader.split_indices("train")), reader.hidden_sizes[reader.layers[-1]])
    np.testing.assert_allclose(features[0].numpy(), want, rtol=1e-5, atol=1e-6)
    probe = linear_probe(reader)
    # Ten digits (chance 0.1): EfficientNet's pooled last stage separates them, so the probe gets most right
    # (0.76 of the 25 test digits when written).
    assert probe["probe_test_acc"] >= 0.5, probe


@pytest.mark.slow
def test_clip4clip_variant_trains_from_a_tiny_bert_cache(shared_extraction: Extraction):
    config = TrainConfig(
        variant="clip4clip", epochs=2, batch_size=16, lr=1e-2, block_examples=32, probe_baseline=False
    )
    with open_cache(shared_extraction.view) as reader:
        assert reader.layers == [0, 1, 2]
        result = train_task(reader, config, seed=0, progress=False)
        assert len(result.history) == 2 and all(math.isfinite(h["train_loss"]) for h in result.history)
        assert 0.0 <= result.metrics["test_acc"] <= 1.0
        assert len(result.layer_weights) == 2  # embeddings and layer 1; layer 2 is the anchor
        with pytest.raises(UniptError, match="holds token sequences"):
            train_task(reader, TrainConfig(variant="cnn", epochs=1), seed=0, progress=False)
