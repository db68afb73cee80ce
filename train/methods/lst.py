"""Ladder Side-Tuning (LST, Sung et al., NeurIPS 2022): a small side network, fed by every backbone layer
through gated "ladder" connections, trained without back-propagating through the backbone.

With hidden states ``H_0 .. H_L`` (``H_0`` the embeddings) and side width ``d_s = d_L / r``:

1. ``z_0 = Down_0(H_0)``
2. for ``l = 1 .. L``: ``mu_l = sigmoid(alpha_l / T)``, ``z = mu_l * Down_l(H_l) + (1 - mu_l) * z``, then
   ``z = Block_l(z)``, a transformer layer of width ``d_s`` (self-attention over real tokens only)
3. output ``Up(LN(z))``, mean-pooled over real tokens, then the task's linear head

``Down_l`` are per-layer linear maps (the paper's downsamplers), ``alpha_l`` start at 0 (an even gate),
``T = 0.1`` as in the official code. Differences from the paper, said out loud: the side blocks are
randomly initialised (LST initialises them from the pruned backbone, which needs the backbone's weights
that a cache-only trainer does not hold), and the side network is an encoder with a pooled head rather
than T5's side decoder. ``layer_weights`` are each layer's share of the final side state through the
ladder: ``mu_l * prod_{k>l} (1 - mu_k)`` (with ``mu_0 = 1``), which sums to 1 over the layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unipt.pipeline.config import TrainConfig
from unipt.train.methods.unipt.transformer import masked_mean

GATE_TEMPERATURE = 0.1


def side_heads(width: int) -> int:
    """The most attention heads (up to 8) that divide the side width into heads of 8+ dimensions."""
    return next(h for h in (8, 4, 2, 1) if width % h == 0 and width // h >= 8 or h == 1)


class LadderSideNetwork(nn.Module):
    def __init__(self, widths: list[int], num_outputs: int, reduction: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        side = max(8, widths[-1] // reduction)
        self.down = nn.ModuleList(nn.Linear(width, side) for width in widths)
        self.gates = nn.Parameter(torch.zeros(len(widths) - 1))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                side,
                side_heads(side),
                4 * side,
                dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in widths[1:]
        )
        self.norm = nn.LayerNorm(side)
        self.up = nn.Linear(side, widths[-1])
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], num_outputs)

    def forward(self, hidden: list[Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
        padding = ~mask.bool()
        gates = torch.sigmoid(self.gates / GATE_TEMPERATURE)
        z = self.down[0](hidden[0].float())
        for layer, block in enumerate(self.blocks, start=1):
            z = gates[layer - 1] * self.down[layer](hidden[layer].float()) + (1 - gates[layer - 1]) * z
            z = block(z, src_key_padding_mask=padding)
        pooled = masked_mean(self.up(self.norm(z)), mask)
        return self.head(self.dropout(pooled)), ladder_shares(gates).expand(len(mask), -1)


def ladder_shares(gates: Tensor) -> Tensor:
    """[L-1] gates -> [L] shares: how much of each layer's (downsampled) input reaches the last mix."""
    ones = torch.ones(1, dtype=gates.dtype, device=gates.device)
    mu = torch.cat([ones, gates])  # layer 0 enters whole
    keep_after = torch.flip(torch.cumprod(torch.flip(torch.cat([1 - gates, ones]), [0]), 0), [0])
    return mu * keep_after


def build(widths: list[int], num_outputs: int, config: TrainConfig) -> nn.Module:
    return LadderSideNetwork(widths, num_outputs, reduction=config.side_reduction, dropout=config.dropout)
