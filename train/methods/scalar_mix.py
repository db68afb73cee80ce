"""Scalar mix (ELMo, Peters et al. 2018): a learned softmax-weighted sum of every layer, scaled by a
learned gamma, mean-pooled over real tokens, then a one-hidden-layer MLP.

``mix = gamma * sum_l softmax(s)_l H_l``. Pooling is linear, so the mix of the layers' masked means is the
masked mean of the mix: the model pools each layer once and mixes [B, L, d] instead of [B, L, N, d].
It sees every layer but has no token interaction across layers: the baseline that tells whether UniPT's
gain over the probe comes from its parallel interaction or only from seeing all layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unipt.pipeline.config import TrainConfig
from unipt.pipeline.errors import UniptError
from unipt.train.methods.unipt.transformer import masked_mean


class ScalarMixClassifier(nn.Module):
    def __init__(self, widths: list[int], num_outputs: int, dropout: float = 0.1) -> None:
        super().__init__()
        if len(set(widths)) != 1:
            raise UniptError(
                f"train.method scalar_mix sums layers, so they need one width, got {widths}; "
                "store layers of one width (backbone.layers) or use unipt or lst"
            )
        width = widths[0]
        self.scalars = nn.Parameter(torch.zeros(len(widths)))  # softmax of zeros: an even mix to start
        self.gamma = nn.Parameter(torch.ones(()))
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(width, num_outputs),
        )

    def forward(self, hidden: list[Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
        pooled = torch.stack([masked_mean(h, mask) for h in hidden], dim=1)  # [B, L, d]
        weights = torch.softmax(self.scalars, dim=0)
        mixed = self.gamma * torch.einsum("l,bld->bd", weights.to(pooled.dtype), pooled)
        return self.head(mixed), weights.expand(len(mask), -1)


def build(widths: list[int], num_outputs: int, config: TrainConfig) -> nn.Module:
    return ScalarMixClassifier(widths, num_outputs, dropout=config.dropout)
