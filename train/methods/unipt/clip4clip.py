"""UniPT as the official CLIP4Clip code builds it (shared/UNIPT.md, last paragraph of the transformer part).

Differences from :class:`unipt.train.methods.unipt.transformer.UniPT`, all taken from that code:

- downsampling is ``ReLU -> Linear`` with no LayerNorm;
- the anchor is the backbone's final output (here the last cached hidden state ``H_L``) with a
  projection of its own, and its pooled form is its first token, not a masked mean;
- the interaction has no ``+ I``; instead the first (or a chosen) token of ``T_l`` is added to every
  query: ``S_l = l1norm(relu(A T_l^T * M)) T_l + T_l[pos]``;
- the aggregate goes back to the backbone's own width and is added to the raw final output:
  ``O = H_L + Up(S)`` with ``Up = ReLU -> Linear``.

The official code interacts with every hidden state, the last included, because its anchor is the
projected pooled output, a tensor distinct from any hidden state. Here the anchor *is* ``H_L``,
so the interaction runs over l < L, as in the other variants, and there is one weight per such layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unipt.train.methods.unipt.transformer import UniPTOutput, l1norm, masked_mean


class UniPTClip4Clip(nn.Module):
    """``hidden_sizes`` lists every hidden state's width, anchor last; the output has the anchor's width."""

    def __init__(self, hidden_sizes: list[int], downsample_factor: int = 2) -> None:
        super().__init__()
        if len(hidden_sizes) < 2:
            raise ValueError("UniPT needs at least two hidden states (one anchor and one to interact with)")
        width = hidden_sizes[-1]
        d = width // downsample_factor
        if d < 1:
            raise ValueError(f"anchor width {width} // downsample_factor {downsample_factor} must be >= 1")
        self.hidden_sizes = list(hidden_sizes)
        self.embed_size = width
        self.downsample = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Linear(h, d)) for h in hidden_sizes[:-1])
        self.anchor_downsample = nn.Sequential(nn.ReLU(), nn.Linear(width, d))
        self.gate = nn.Linear(d, 1)
        self.up = nn.Sequential(nn.ReLU(), nn.Linear(d, width))

    def forward(self, hidden: list[Tensor], mask: Tensor, position: Tensor | None = None) -> UniPTOutput:
        """``position`` [B] picks the token of ``T_l`` added to every query (CLIP's EOT); default: first."""
        if len(hidden) != len(self.downsample) + 1:
            raise ValueError(f"expected {len(self.downsample) + 1} hidden states, got {len(hidden)}")
        raw = hidden[-1]
        mask = mask.to(raw.dtype)
        anchor = self.anchor_downsample(raw)  # [B, N, d]
        rows = torch.arange(raw.shape[0], device=raw.device)
        picked = torch.zeros_like(rows) if position is None else position.to(raw.device)
        pooled_anchor = anchor[rows, 0]  # the official code pools the anchor by its first token

        interacted, confidences = [], []
        for down, h in zip(self.downsample, hidden[:-1], strict=True):
            target = down(h)  # [B, N, d]
            weights = (anchor @ target.transpose(1, 2)) * mask[:, None, :]  # a padded token is never a key
            weights = l1norm(torch.relu(weights), dim=-1)
            interacted.append(weights @ target + target[rows, picked][:, None, :])
            confidences.append(self.gate(pooled_anchor * masked_mean(target, mask)))
        layer_weights = torch.softmax(torch.cat(confidences, dim=1), dim=1)  # [B, L]
        aggregated = torch.einsum("bl,blnd->bnd", layer_weights, torch.stack(interacted, dim=1))
        return UniPTOutput(tokens=raw + self.up(aggregated), layer_weights=layer_weights)


class UniPTClip4ClipClassifier(nn.Module):
    """The CLIP4Clip-style UniPT plus a classification head on its first output token.

    The first token is the one the variant pools its anchor by, and CLIP4Clip's output is that one
    pooled vector.
    """

    def __init__(
        self, hidden_sizes: list[int], num_classes: int, downsample_factor: int = 2, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.unipt = UniPTClip4Clip(hidden_sizes, downsample_factor)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.unipt.embed_size, num_classes)

    def forward(self, hidden: list[Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.unipt(hidden, mask)
        return self.classifier(self.dropout(out.tokens[:, 0])), out.layer_weights
