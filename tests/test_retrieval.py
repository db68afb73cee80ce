"""Retrieval between two backbones' caches of one dataset: metrics by hand, and training end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import KEY, build_cache, save_tiny_bert, write_config
from unipt.pipeline import experiment
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.config import TrainConfig, load_config
from unipt.pipeline.errors import UniptError
from unipt.train.contrastive import evaluate_retrieval, paired_batches, retrieval_metrics_chunked
from unipt.train.metrics import match_ranks, retrieval_metrics
from unipt.train.tasks import train_task


def test_recall_and_rsum_by_hand():
    # Query 0 finds its match first, query 1 second (behind item 0), query 2 third.
    similarity = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.5, 0.1], [0.7, 0.6, 0.3]])
    assert match_ranks(similarity).tolist() == [0, 1, 2]
    assert match_ranks(similarity.T).tolist() == [0, 1, 0]  # gallery item 1: query 2 scores 0.6 > 0.5
    metrics = retrieval_metrics(similarity)
    assert metrics["q2g_r1"] == pytest.approx(100 / 3) and metrics["q2g_r5"] == 100.0
    assert metrics["g2q_r1"] == pytest.approx(200 / 3) and metrics["g2q_r10"] == 100.0
    assert metrics["rsum"] == pytest.approx(500.0)
    # The chunked version used on large splits agrees with the full matrix.
    a, b = torch.nn.functional.normalize(torch.randn(1100, 8), dim=1), torch.randn(1100, 8)
    assert retrieval_metrics_chunked(a, b) == pytest.approx(retrieval_metrics(a @ b.T))


def test_caches_of_different_examples_are_refused(tmp_path):
    lengths = [3, 4, 5, 2]
    build_cache(CacheRoot(tmp_path / "a"), lengths, {0: 4, 1: 4})
    build_cache(CacheRoot(tmp_path / "b"), lengths + [3], {0: 4, 1: 4})
    one, two = (open_cache(CacheRoot(tmp_path / name).location(KEY)) for name in "ab")
    with pytest.raises(UniptError, match="hold different examples"):
        train_task([one, two], TrainConfig(task="retrieval", epochs=1), seed=0, progress=False)


@pytest.fixture(scope="module")
def second_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another random BERT, of another width, so the two sides share nothing but the text."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-48"), hidden_size=48, seed=1)


@pytest.mark.e2e
def test_retrieval_across_two_backbones_learns_to_match_examples(
    ray_session, tmp_path, sentiment_csv, tiny_bert_dir, second_bert_dir
):
    readers = []
    for name, backbone in (("query", tiny_bert_dir), ("gallery", second_bert_dir)):
        config = write_config(tmp_path / f"{name}.yaml", str(sentiment_csv), str(backbone), tmp_path)
        readers.append(
            open_cache(experiment.extract(experiment.prepare(load_config(config)), progress=False).path)
        )
    query, gallery = readers
    assert query.hidden_sizes[2] == 32 and gallery.hidden_sizes[2] == 48

    config = TrainConfig(
        task="retrieval", epochs=10, batch_size=16, lr=2e-3, warmup_ratio=0.3, dropout=0.0, embed_size=32
    )
    result = train_task([query, gallery], config, seed=0, progress=False)
    m = result.metrics
    for split in ("val", "test"):
        for key in ("q2g_r1", "q2g_r5", "q2g_r10", "g2q_r1", "g2q_r5", "g2q_r10"):
            assert 0.0 <= m[f"{split}_{key}"] <= 100.0
        assert m[f"{split}_rsum"] == pytest.approx(
            sum(m[f"{split}_{d}_r{k}"] for d in ("q2g", "g2q") for k in (1, 5, 10))
        )
        assert m[f"{split}_q2g_r1"] <= m[f"{split}_q2g_r5"] <= m[f"{split}_q2g_r10"]
    assert 0 < m["temperature"] and math.isfinite(m["train_seconds"])
    assert len(result.layer_weights) == len(result.gallery_layer_weights) == 2
    assert [h["epoch"] for h in result.history] == list(range(1, 11))

    train = paired_batches(query, gallery, "train", config, seed=0, shuffle=False)
    n = len(train.query.indices)
    chance = 2 * (1 + 5 + 10) / n * 100  # expected rSum of random embeddings
    trained = evaluate_retrieval(result.model, train, torch.device("cpu"))
    assert trained["rsum"] > 5 * chance, (trained["rsum"], chance)
    assert m["test_rsum"] > 2 * chance, (m["test_rsum"], chance)
