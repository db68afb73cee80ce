"""UniPT against a step-by-step reference written from shared/UNIPT.md, one example at a time."""

from __future__ import annotations

import torch

from tests.conftest import random_padded_batch
from unipt.train.methods.unipt.transformer import UniPT, UniPTClassifier


def reference_unipt(
    model: UniPT, hidden: list[torch.Tensor], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """UNIPT.md steps 1-5 for a single unpadded example: hidden[l] is [length, D_l]."""
    hidden = [h[:length] for h in hidden]
    targets = [down(h) for down, h in zip(model.downsample, hidden, strict=True)]  # step 1
    anchor = targets[-1]
    a = anchor.mean(0)  # step 2
    interacted, confidences = [], []
    for t in targets[:-1]:
        w = anchor @ t.T  # step 3
        w = torch.relu(w)
        w = w / torch.clamp(w.abs().sum(dim=1, keepdim=True), min=1e-6)
        w = w + torch.eye(length)
        interacted.append(w @ t)
        confidences.append(model.gate(a * t.mean(0)))  # step 4
    weights = torch.softmax(torch.cat(confidences), dim=0)
    s = sum(w * s_l for w, s_l in zip(weights, interacted, strict=True))
    out = anchor + model.projection(s)  # step 5
    return model.up(torch.relu(out)), weights


def test_batched_unipt_matches_reference_per_example():
    torch.manual_seed(0)
    widths = [12, 12, 16, 12]  # a wider layer checks per-layer downsampling
    model = UniPT(widths, embed_size=8, downsample_factor=2).eval()
    lengths = [5, 2, 7]
    hidden, mask = random_padded_batch(lengths, widths)
    with torch.no_grad():
        out = model(hidden, mask)
        for i, n in enumerate(lengths):
            ref_tokens, ref_weights = reference_unipt(model, [h[i] for h in hidden], n)
            torch.testing.assert_close(out.tokens[i, :n], ref_tokens, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.layer_weights[i], ref_weights, rtol=1e-5, atol=1e-6)
    assert out.tokens.shape == (3, 7, 8)
    assert out.layer_weights.shape == (3, 3)
    torch.testing.assert_close(out.layer_weights.sum(1), torch.ones(3))


def test_padded_tokens_never_change_real_outputs():
    torch.manual_seed(1)
    widths = [10, 10, 10]
    model = UniPTClassifier(widths, num_classes=3, embed_size=10, downsample_factor=2, dropout=0.0).eval()
    hidden, mask = random_padded_batch([4, 6], widths, seed=3)
    longer = [torch.cat([h, 50 * torch.randn(2, 5, h.shape[-1])], dim=1) for h in hidden]  # garbage padding
    longer_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        logits, weights = model(hidden, mask)
        logits_long, weights_long = model(longer, longer_mask)
        tokens = model.unipt(hidden, mask).tokens
        tokens_long = model.unipt(longer, longer_mask).tokens
    torch.testing.assert_close(logits, logits_long, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, weights_long, rtol=1e-5, atol=1e-6)
    for i, n in enumerate([4, 6]):
        torch.testing.assert_close(tokens[i, :n], tokens_long[i, :n], rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter():
    widths = [6, 6, 6]
    model = UniPTClassifier(widths, num_classes=2, embed_size=6, downsample_factor=2, dropout=0.0)
    hidden, mask = random_padded_batch([3, 5], widths)
    logits, _ = model(hidden, mask)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
