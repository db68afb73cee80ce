"""UniPT (Universal Parallel Tuning, Diao et al., CVPR 2024), transformer variant.

The math follows the paper's official code as written down in shared/UNIPT.md:

1. per hidden state l: ``T_l = LN(Linear_l(H_l))`` -> [B, N, d]
2. anchor ``A = T_L`` (last layer); pooled ``a = masked_mean(A)``, ``t_l = masked_mean(T_l)``
3. parallel interaction, l < L: ``W = A @ T_l^T``, padded keys zeroed, ``relu``, l1-normalised over
   keys, ``+ I``; ``S_l = W @ T_l``
4. confidence aggregation: ``c_l = g(a * t_l)`` with one shared gate, ``w = softmax_l(c)``,
   ``S = sum_l w_l S_l``
5. ``O = A + LN(Linear(S))``; output ``Up(ReLU(O))`` -> [B, N, embed_size]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unipt.train.stored_inputs import StoredInputLinear


def l1norm(x: Tensor, dim: int) -> Tensor:
    return x / x.abs().sum(dim=dim, keepdim=True).clamp_min(1e-6)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the token axis (-2) of ``x`` counting only tokens where ``mask`` is 1."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=-2) / weights.sum(dim=-2).clamp_min(1.0)


def interact_and_aggregate(
    anchor: Tensor, others: Tensor, mask: Tensor, gate: nn.Module
) -> tuple[Tensor, Tensor]:
    """Steps 3 and 4, shared by the transformer and CNN variants.

    ``anchor`` [B, N, d], ``others`` [B, L, N, d] (the non-anchor layers, on the anchor's N positions),
    ``mask`` [B, N] (1 on real tokens). Returns ``S = sum_l w_l S_l`` [B, N, d] and ``w`` [B, L].
    """
    weights = torch.einsum("bnd,blmd->blnm", anchor, others)
    weights = weights * mask[:, None, None, :]  # a padded token is never a key
    weights = l1norm(torch.relu(weights), dim=-1)
    weights = weights + torch.eye(weights.shape[-1], dtype=weights.dtype, device=weights.device)
    interacted = torch.einsum("blnm,blmd->blnd", weights, others)  # S_l

    pooled_anchor = masked_mean(anchor, mask)  # [B, d]
    pooled_targets = masked_mean(others, mask[:, None, :])  # [B, L, d]
    confidence = gate(pooled_anchor[:, None, :] * pooled_targets).squeeze(-1)  # [B, L]
    layer_weights = torch.softmax(confidence, dim=1)
    return torch.einsum("bl,blnd->bnd", layer_weights, interacted), layer_weights


@dataclass
class UniPTOutput:
    tokens: Tensor  # [B, N, embed_size]
    layer_weights: Tensor  # [B, L] confidence weights over the non-anchor layers


class UniPT(nn.Module):
    """The parallel network. ``hidden_sizes`` lists the input width of every hidden state, anchor last."""

    def __init__(self, hidden_sizes: list[int], embed_size: int, downsample_factor: int = 2) -> None:
        super().__init__()
        if len(hidden_sizes) < 2:
            raise ValueError("UniPT needs at least two hidden states (one anchor and one to interact with)")
        d = embed_size // downsample_factor
        if d < 1:
            raise ValueError(f"embed_size {embed_size} // downsample_factor {downsample_factor} must be >= 1")
        self.hidden_sizes = list(hidden_sizes)
        self.embed_size = embed_size
        # The cached layers meet nothing before these Linears, so they take the cache's 16-bit rows as they
        # are (see unipt.train.stored_inputs); parameters and state-dict keys are nn.Linear's.
        self.downsample = nn.ModuleList(
            nn.Sequential(StoredInputLinear(h, d), nn.LayerNorm(d)) for h in hidden_sizes
        )
        self.gate = nn.Linear(d, 1)
        self.projection = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.up = nn.Linear(d, embed_size)

    def forward(self, hidden: list[Tensor], mask: Tensor) -> UniPTOutput:
        if len(hidden) != len(self.downsample):
            raise ValueError(f"expected {len(self.downsample)} hidden states, got {len(hidden)}")
        mask = mask.to(self.gate.weight.dtype)  # the hidden states may come in the cache's 16-bit dtype
        targets = [down(h) for down, h in zip(self.downsample, hidden, strict=True)]
        anchor = targets[-1]  # [B, N, d]
        others = torch.stack(targets[:-1], dim=1)  # [B, L, N, d]

        aggregated, layer_weights = interact_and_aggregate(anchor, others, mask, self.gate)
        out = anchor + self.projection(aggregated)
        return UniPTOutput(tokens=self.up(torch.relu(out)), layer_weights=layer_weights)


class UniPTClassifier(nn.Module):
    """UniPT plus a classification head over the masked mean of its output tokens."""

    takes_stored_dtype = True  # every hidden state goes straight into a StoredInputLinear

    def __init__(
        self,
        hidden_sizes: list[int],
        num_classes: int,
        embed_size: int,
        downsample_factor: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.unipt = UniPT(hidden_sizes, embed_size, downsample_factor)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embed_size, num_classes)

    def forward(self, hidden: list[Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.unipt(hidden, mask)
        pooled = masked_mean(out.tokens, mask)
        return self.classifier(self.dropout(pooled)), out.layer_weights
