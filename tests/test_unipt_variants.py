"""UniPT's CNN and CLIP4Clip variants against step-by-step references written from shared/UNIPT.md.

The references work on one example at a time with loops and plain tensor ops; convolutions and
batch norm are spelled out from the modules' parameters, so nothing here runs the modules' own code
paths (only Linear layers are called, as in tests/test_unipt_math.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_padded_batch
from unipt.train.methods.unipt.clip4clip import UniPTClip4Clip, UniPTClip4ClipClassifier
from unipt.train.methods.unipt.cnn import UniPTCNN, UniPTCNNClassifier

# ---------------------------------------------------------------------------------------------------------
# CNN variant


def conv1x1(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution of one [C, H, W] map, as a channel mix at every position."""
    return torch.einsum("oc,chw->ohw", conv.weight[:, :, 0, 0], x) + conv.bias[:, None, None]


def batch_norm_eval(bn: torch.nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    def per_channel(v: torch.Tensor) -> torch.Tensor:
        return v[:, None, None]

    scale = per_channel(bn.weight) / torch.sqrt(per_channel(bn.running_var) + bn.eps)
    return (x - per_channel(bn.running_mean)) * scale + per_channel(bn.bias)


def conv_bn(block: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    return batch_norm_eval(block[1], conv1x1(block[0], x))


def positions(x: torch.Tensor) -> torch.Tensor:
    """[C, H, W] -> [H*W, C], row-major over (H, W)."""
    c, h, w = x.shape
    return torch.stack([x[:, i, j] for i in range(h) for j in range(w)])


def reference_cnn(model: UniPTCNN, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """UNIPT.md's CNN variant for one example: ``maps[l]`` is [C_l, H_l, W_l], the anchor stage last."""
    last = maps[-1]
    _, hl, wl = last.shape
    anchor_map = conv_bn(model.downsample[-1], last)
    anchor = positions(anchor_map)  # [N, d]
    interacted, confidences = [], []
    for index, x in enumerate(maps[:-1]):
        c, h, w = x.shape
        rh, rw = h // hl, w // wl
        identity = torch.relu(conv1x1(model.identity[index][0], last))  # [C_l, H_L, W_L]
        upsampled = torch.empty(c, h, w)
        for y in range(h):
            for z in range(w):
                upsampled[:, y, z] = identity[:, y // rh, z // rw]  # nearest
        scores = (upsampled * x).sum(dim=0)  # channel sum: [H_l, W_l]
        pooled = torch.zeros(c, hl, wl)
        for i in range(hl):
            for j in range(wl):
                window = torch.relu(scores[i * rh : (i + 1) * rh, j * rw : (j + 1) * rw])
                window = window / torch.clamp(window.abs().sum(), min=1e-6) + 1.0 / (rh * rw)
                block = x[:, i * rh : (i + 1) * rh, j * rw : (j + 1) * rw]
                pooled[:, i, j] = (block * window).sum(dim=(1, 2))  # weighted, then sum-pooled
        target = positions(conv_bn(model.downsample[index], pooled))  # [N, d]
        weights = torch.relu(anchor @ target.T)
        weights = weights / torch.clamp(weights.abs().sum(dim=1, keepdim=True), min=1e-6)
        weights = weights + torch.eye(len(anchor))
        interacted.append(weights @ target)
        confidences.append(model.gate(anchor.mean(0) * target.mean(0)))
    layer_weights = torch.softmax(torch.cat(confidences), dim=0)
    s = sum(w * s_l for w, s_l in zip(layer_weights, interacted, strict=True))  # [N, d]
    rolled = torch.zeros_like(anchor_map)
    for n in range(hl * wl):
        rolled[:, n // wl, n % wl] = s[n]
    out = anchor_map + conv_bn(model.projection, rolled)
    return positions(conv1x1(model.up, torch.relu(out))), layer_weights


def _randomize_batch_norm(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine terms, so a reference that skipped BN would fail."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=g))
            module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            module.weight.data.copy_(torch.randn(n, generator=g))
            module.bias.data.copy_(torch.randn(n, generator=g))


@pytest.mark.parametrize(
    ("channels", "grids"),
    [
        ([3, 5, 4, 6], [(8, 8), (4, 4), (2, 2), (2, 2)]),  # ratios 4, 2 and 1 (same size as the anchor)
        ([4, 3, 5], [(6, 9), (4, 3), (2, 3)]),  # a 3x3 window and a non-square 2x1 window
    ],
)
def test_cnn_variant_matches_reference_per_example(channels, grids):
    torch.manual_seed(0)
    model = UniPTCNN(channels, grids, embed_size=8, downsample_factor=2)
    _randomize_batch_norm(model, seed=1)
    model.eval()
    g = torch.Generator().manual_seed(2)
    maps = [torch.randn(3, c, *grid, generator=g) for c, grid in zip(channels, grids, strict=True)]
    with torch.no_grad():
        out = model(maps)
        for i in range(3):
            tokens, weights = reference_cnn(model, [m[i] for m in maps])
            torch.testing.assert_close(out.tokens[i], tokens, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.layer_weights[i], weights, rtol=1e-5, atol=1e-6)
    last_h, last_w = grids[-1]
    assert out.tokens.shape == (3, last_h * last_w, 8)
    assert out.layer_weights.shape == (3, len(channels) - 1)
    assert model.ratios == [(h // last_h, w // last_w) for h, w in grids[:-1]]


def test_cnn_reweighting_keeps_every_position_when_a_window_scores_nothing():
    """A window whose scores are all <= 0 relu-normalises to 0; the + 1/r^2 then averages it evenly."""
    model = UniPTCNN([2, 2], [(4, 4), (2, 2)], embed_size=4).eval()
    with torch.no_grad():
        for p in model.identity[0][0].parameters():
            p.zero_()  # identity = relu(0) = 0: every score is 0
        stage = torch.randn(1, 2, 4, 4)
        pooled = model.reweighted(0, stage, torch.randn(1, 2, 2, 2))
    # Every weight is then 1/4: each 2x2 window pools to its mean.
    expected = stage.view(1, 2, 2, 2, 2, 2).mean(dim=(3, 5))
    torch.testing.assert_close(pooled, expected)


@pytest.mark.parametrize(
    ("grids", "message"),
    [
        ([(14, 14), (4, 4)], r"stage 0 is 14x14, the last is 4x4 \(ratio 3.5x3.5\)"),
        ([(8, 6), (4, 4)], r"stage 0 is 8x6, the last is 4x4"),
        ([(2, 2), (4, 4)], r"stage 0 is 2x2, the last is 4x4"),  # a smaller stage cannot be pooled down
    ],
)
def test_cnn_variant_refuses_non_integer_stride_ratios(grids, message):
    with pytest.raises(ValueError, match=message):
        UniPTCNN([3, 3], grids, embed_size=4)


def test_cnn_gradients_reach_every_parameter():
    channels, grids = [3, 4, 5], [(8, 8), (4, 4), (2, 2)]
    model = UniPTCNNClassifier(channels, grids, num_classes=2, embed_size=6, dropout=0.0)
    maps = [torch.randn(4, c, *g) for c, g in zip(channels, grids, strict=True)]
    logits, weights = model(maps)
    assert logits.shape == (4, 2) and weights.shape == (4, 2)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_cnn_classifier_pools_the_mean_over_anchor_positions():
    channels, grids = [3, 4], [(4, 4), (2, 2)]
    model = UniPTCNNClassifier(channels, grids, num_classes=3, embed_size=6, dropout=0.0).eval()
    maps = [torch.randn(2, c, *g) for c, g in zip(channels, grids, strict=True)]
    with torch.no_grad():
        logits, _ = model(maps)
        tokens = model.unipt(maps).tokens
        expected = tokens.mean(1) @ model.classifier.weight.T + model.classifier.bias
    torch.testing.assert_close(logits, expected)


# ---------------------------------------------------------------------------------------------------------
# CLIP4Clip variant


def reference_clip4clip(
    model: UniPTClip4Clip, hidden: list[torch.Tensor], length: int, position: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLIP4Clip form for one unpadded example: hidden[l] is [length, D_l], the anchor layer last."""
    hidden = [h[:length] for h in hidden]
    raw = hidden[-1]
    anchor = model.anchor_downsample[1](torch.relu(raw))  # ReLU -> Linear, its own projection
    a = anchor[0]  # pooled by its first token
    interacted, confidences = [], []
    for index, h in enumerate(hidden[:-1]):
        t = model.downsample[index][1](torch.relu(h))  # ReLU -> Linear, no LayerNorm
        w = torch.relu(anchor @ t.T)
        w = w / torch.clamp(w.abs().sum(dim=1, keepdim=True), min=1e-6)  # no + I here
        interacted.append(w @ t + t[position])
        confidences.append(model.gate(a * t.mean(0)))
    weights = torch.softmax(torch.cat(confidences), dim=0)
    s = sum(w * s_l for w, s_l in zip(weights, interacted, strict=True))
    return raw + model.up[1](torch.relu(s)), weights


def test_clip4clip_variant_matches_reference_per_example():
    torch.manual_seed(0)
    widths = [12, 10, 16, 8]  # the output has the anchor's (last) width
    model = UniPTClip4Clip(widths, downsample_factor=2).eval()
    lengths = [5, 2, 7]
    hidden, mask = random_padded_batch(lengths, widths)
    with torch.no_grad():
        out = model(hidden, mask)
        chosen = model(hidden, mask, position=torch.tensor([4, 1, 3]))
        for i, n in enumerate(lengths):
            tokens, weights = reference_clip4clip(model, [h[i] for h in hidden], n)
            torch.testing.assert_close(out.tokens[i, :n], tokens, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.layer_weights[i], weights, rtol=1e-5, atol=1e-6)
            tokens, weights = reference_clip4clip(model, [h[i] for h in hidden], n, position=[4, 1, 3][i])
            torch.testing.assert_close(chosen.tokens[i, :n], tokens, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(chosen.layer_weights[i], weights, rtol=1e-5, atol=1e-6)
    assert out.tokens.shape == (3, 7, 8)
    assert out.layer_weights.shape == (3, 3)
    assert not torch.allclose(out.tokens, chosen.tokens)  # the chosen token does matter


def test_clip4clip_padded_tokens_never_change_real_outputs():
    torch.manual_seed(1)
    widths = [10, 6, 10]
    model = UniPTClip4ClipClassifier(widths, num_classes=3, downsample_factor=2, dropout=0.0).eval()
    lengths = [4, 6]
    hidden, mask = random_padded_batch(lengths, widths, seed=3)
    g = torch.Generator().manual_seed(4)
    longer = [torch.cat([h, 50 * torch.randn(2, 5, h.shape[-1], generator=g)], dim=1) for h in hidden]
    longer_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], dim=1)
    # Garbage also in the padded slots inside the original length of the shorter example.
    for h in longer:
        h[0, 4:6] = 50 * torch.randn(2, h.shape[-1], generator=g)
    with torch.no_grad():
        logits, weights = model(hidden, mask)
        logits_long, weights_long = model(longer, longer_mask)
        tokens = model.unipt(hidden, mask).tokens
        tokens_long = model.unipt(longer, longer_mask).tokens
    torch.testing.assert_close(logits, logits_long, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, weights_long, rtol=1e-5, atol=1e-6)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(tokens[i, :n], tokens_long[i, :n], rtol=1e-5, atol=1e-5)


def test_clip4clip_gradients_reach_every_parameter_and_head_reads_the_first_token():
    widths = [6, 6, 6]
    model = UniPTClip4ClipClassifier(widths, num_classes=2, downsample_factor=2, dropout=0.0)
    hidden, mask = random_padded_batch([3, 5], widths)
    logits, _ = model(hidden, mask)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    with torch.no_grad():
        first = model.unipt(hidden, mask).tokens[:, 0]
        torch.testing.assert_close(
            model(hidden, mask)[0], first @ model.classifier.weight.T + model.classifier.bias
        )
