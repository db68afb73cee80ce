"""The other frozen-backbone methods on a cache (train.method): LST, scalar mix and the trained linear
probe. Each is checked like UniPT: shapes, padding invariance, a hand-worked case, and a real training
run through the same task code, export and reload."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import KEY, build_cache, random_padded_batch
from unipt.pipeline.cache.layout import LayerSpec
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.config import TrainConfig
from unipt.pipeline.errors import UniptError
from unipt.pipeline.method_names import METHOD_NAMES
from unipt.train.methods import build_method, build_model, registered_methods
from unipt.train.methods.lst import GATE_TEMPERATURE, LadderSideNetwork, ladder_shares
from unipt.train.methods.scalar_mix import ScalarMixClassifier
from unipt.train.methods.unipt.transformer import masked_mean
from unipt.train.tasks import train_task

METHODS = ("lst", "scalar_mix", "linear_probe")
WIDTHS = [16, 16, 16]


class _TokenShape:
    """What a method's builder reads from a token cache (one layer per width), without a cache."""

    def __init__(self, widths: list[int], grid: tuple[int, int] | None = None) -> None:
        self.source = "(no cache)"
        self.layers = list(range(len(widths)))
        self.hidden_sizes = dict(enumerate(widths))
        self.label_names = ["a", "b"]
        self._grid = grid

    def layer_spec(self, layer: int) -> LayerSpec:
        return LayerSpec(layer, self.hidden_sizes[layer], self._grid)


def _model(method: str, outputs: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    config = TrainConfig(method=method, side_reduction=2)
    return build_method(method, _TokenShape(WIDTHS), outputs, config).eval()


@pytest.mark.parametrize("method", METHODS)
def test_shapes_and_layer_weights(method):
    hidden, mask = random_padded_batch([3, 5, 1, 4], WIDTHS)
    outputs, weights = _model(method)(hidden, mask)
    assert outputs.shape == (4, 3) and weights.shape == (4, len(WIDTHS))
    assert torch.allclose(weights.sum(-1), torch.ones(4))  # a share of every layer, summing to 1


@pytest.mark.parametrize("method", METHODS)
def test_padding_never_changes_a_real_output(method):
    """Extra padding, holding garbage, changes nothing for the real tokens' prediction."""
    model = _model(method)
    hidden, mask = random_padded_batch([3, 5], WIDTHS, seed=1)
    longer = [torch.cat([h, 100 * torch.randn(2, 4, h.shape[-1])], dim=1) for h in hidden]
    longer_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        short, _ = model(hidden, mask)
        long, _ = model(longer, longer_mask)
        alone, _ = model([h[:1, :3] for h in hidden], mask[:1, :3])  # the first example, unpadded
    assert torch.allclose(short, long, atol=1e-5)
    assert torch.allclose(short[:1], alone, atol=1e-5)


def test_scalar_mix_by_hand():
    model = ScalarMixClassifier([2, 2], num_outputs=2, dropout=0.0).eval()
    with torch.no_grad():
        model.scalars.copy_(torch.tensor([0.0, math.log(3.0)]))  # softmax -> [0.25, 0.75]
        model.gamma.fill_(2.0)
    # One example of two real tokens and one padded token.
    h0 = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]])
    h1 = torch.tensor([[[0.0, 4.0], [2.0, 0.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])
    mixed_by_hand = 2.0 * (0.25 * torch.tensor([2.0, 1.0]) + 0.75 * torch.tensor([1.0, 2.0]))  # [2.5, 3.5]
    outputs, weights = model([h0, h1], mask)
    assert torch.allclose(weights, torch.tensor([[0.25, 0.75]]))
    assert torch.allclose(outputs, model.head(mixed_by_hand[None]))


def test_lst_ladder_step_by_step():
    """The side network's forward, recomputed one step at a time from the docstring's equations."""
    torch.manual_seed(3)
    model = LadderSideNetwork([8, 12, 16], num_outputs=2, reduction=2, dropout=0.0).eval()
    with torch.no_grad():
        model.gates.copy_(torch.tensor([0.05, -0.2]))
    hidden, mask = random_padded_batch([4, 2], [8, 12, 16], seed=2)
    padding = ~mask
    mu = torch.sigmoid(model.gates / GATE_TEMPERATURE)
    with torch.no_grad():
        z = model.down[0](hidden[0])
        for layer in (1, 2):
            z = mu[layer - 1] * model.down[layer](hidden[layer]) + (1 - mu[layer - 1]) * z
            z = model.blocks[layer - 1](z, src_key_padding_mask=padding)
        expected = model.head(masked_mean(model.up(model.norm(z)), mask))
        outputs, weights = model(hidden, mask)
    assert torch.allclose(outputs, expected, atol=1e-6)
    share_by_hand = torch.stack([(1 - mu[0]) * (1 - mu[1]), mu[0] * (1 - mu[1]), mu[1]])
    assert torch.allclose(weights[0], share_by_hand) and torch.allclose(ladder_shares(mu), share_by_hand)
    assert model.down[0].out_features == 8  # side width: the last layer's 16 / reduction 2


def test_scalar_mix_refuses_layers_of_different_widths():
    with pytest.raises(UniptError, match="need one width"):
        build_method("scalar_mix", _TokenShape([8, 16]), 2, TrainConfig(method="scalar_mix"))


def test_the_config_accepts_exactly_the_registered_methods():
    """The config checks names without importing torch (pipeline/method_names.py); the registry builds
    them: the two lists must be one list."""
    assert registered_methods() == METHOD_NAMES
    for name in METHOD_NAMES:
        assert TrainConfig(method=name).method == name


def test_unknown_method_is_refused_by_the_config_naming_the_registered_ones():
    with pytest.raises(ValueError, match="unknown method 'adapter'; choose one of unipt, lst, scalar_mix, "):
        TrainConfig(method="adapter")
    with pytest.raises(UniptError, match="unknown train.method 'adapter'; choose one of unipt, lst, "):
        build_method("adapter", _TokenShape(WIDTHS), 2, TrainConfig())


@pytest.mark.parametrize("method", METHODS)
def test_token_methods_refuse_a_feature_map_cache(method):
    maps = _TokenShape([4, 4], grid=(2, 2))
    with pytest.raises(UniptError, match=f"train.method '{method}' reads token sequences, but cache"):
        build_method(method, maps, 2, TrainConfig(method=method))
    assert type(build_method("unipt", maps, 2, TrainConfig(variant="cnn"))).__name__ == "UniPTCNNClassifier"


LENGTHS = [4, 6, 3, 5, 7, 2, 6, 5, 4, 3, 6, 5, 4, 5, 3, 6] * 2
SPLITS = ["train"] * 20 + ["val"] * 6 + ["test"] * 6


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_from_a_cache_through_the_task_registry(tmp_path, method):
    # Labels alternate (chance: 0.5) and every token carries its label (each feature shifted by +-0.75): a
    # method that trains at all gets the test split right. Not the linear probe: its LayerNorm removes a
    # shift that every feature shares, so this label is invisible to it by design.
    build_cache(
        CacheRoot(tmp_path), LENGTHS, {0: 8, 1: 8, 2: 8}, shard_size=8, splits=SPLITS, label_shift=0.75
    )
    reader = open_cache(CacheRoot(tmp_path).location(KEY))
    config = TrainConfig(method=method, epochs=2, batch_size=4, block_examples=4, side_reduction=2, lr=3e-2)
    result = train_task(reader, config, seed=0, progress=False)
    unipt = train_task(reader, config.model_copy(update={"method": "unipt"}), seed=0, progress=False)
    assert math.isfinite(result.metrics["val_acc"]) and math.isfinite(result.metrics["test_acc"])
    learners = [unipt] if method == "linear_probe" else [unipt, result]
    assert all(learned.metrics["test_acc"] >= 5 / 6 for learned in learners), result.metrics
    assert len(result.layer_weights) == 3  # every layer, not UniPT's layers beside the anchor
    assert result.metrics["trainable_params"] != unipt.metrics["trainable_params"]
    assert type(result.model) is type(build_model(reader, config))
    again = train_task(reader, config, seed=0, progress=False)  # deterministic for a seed on CPU
    assert again.metrics["test_acc"] == result.metrics["test_acc"]
    assert again.history[-1]["train_loss"] == result.history[-1]["train_loss"]


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["lst", "scalar_mix"])
def test_a_method_run_is_recorded_exported_and_reloaded(method, tmp_path, tiny_bert_dir, ray_session, capsys):
    """`unipt run --set train.method=...`: the summary, the record, model.json, and the reloaded model
    gives the test split's recorded accuracy from the cache."""
    import json

    import numpy as np

    from tests.conftest import make_sentiment_rows, write_config, write_csv
    from unipt.pipeline.cache.opener import open_cache
    from unipt.pipeline.cli.app import main
    from unipt.pipeline.model.files import read_model_spec
    from unipt.pipeline.model.predict import load_model

    data = write_csv(tmp_path / "reviews.csv", make_sentiment_rows(120))
    config = write_config(tmp_path / "c.yaml", str(data), str(tiny_bert_dir), tmp_path, train={"epochs": 2})
    args = [
        "run",
        str(config),
        "--no-progress",
        "--set",
        f"train.method={method}",
        "--set",
        "train.side_reduction=4",
    ]
    assert main(args) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    record = json.loads((run_dir / "record.json").read_text())
    assert record["config"]["train"]["method"] == method and len(record["layer_weights"]) == 3
    spec = read_model_spec(run_dir)
    assert spec.method == method and spec.side_reduction == 4
    model = load_model(run_dir, device="cpu")
    reader = open_cache(record["cache"]["path"])
    indices, outputs = model.outputs_from_cache(reader, "test")
    accuracy = float(np.mean(outputs.argmax(1) == reader.labels()[indices]))
    assert accuracy == pytest.approx(record["metrics"]["test_acc"])
