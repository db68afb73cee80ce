"""The linear probe as a trained method: one linear layer on the last layer's mean-pooled tokens,
trained by the same loop (AdamW, schedule, best epoch on validation) as every other method.

(The run's closed-form probe baseline, ``train.probe_baseline``, fits a logistic regression with an L2
search instead; this one is the like-for-like row of a method comparison.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unipt.pipeline.config import TrainConfig
from unipt.train.methods.unipt.transformer import masked_mean


class LinearProbeClassifier(nn.Module):
    def __init__(self, width: int, num_outputs: int, num_layers: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)  # activations' scale differs per backbone; the probe should not care
        self.linear = nn.Linear(width, num_outputs)
        self.num_layers = num_layers

    def forward(self, hidden: list[Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
        weights = torch.zeros(len(mask), self.num_layers, device=mask.device)
        weights[:, -1] = 1.0  # all of its weight is on the last layer
        return self.linear(self.norm(masked_mean(hidden[-1], mask))), weights


def build(widths: list[int], num_outputs: int, config: TrainConfig) -> nn.Module:
    return LinearProbeClassifier(widths[-1], num_outputs, len(widths))
