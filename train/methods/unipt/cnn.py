"""UniPT for CNN feature maps (shared/UNIPT.md, "CNN variant").

Stages arrive as maps ``x_l`` of shape [B, C_l, H_l, W_l], last stage (the anchor) last. The last
stage is the coarsest; every other stage is ``r_h x r_w`` times larger, with integer ratios.

For every stage l < L:

1. ``identity_l = ReLU(conv1x1(x_L))`` -> [B, C_l, H_L, W_L], nearest-upsampled to (H_l, W_l),
   multiplied with ``x_l`` and summed over channels: one score per position of stage l.
2. The scores are cut into ``r_h x r_w`` windows (one window per anchor position); in each window
   ``relu`` then l1-normalise, then ``+ 1 / (r_h r_w)``: a reweighting map.
3. ``x_l`` times that map is sum-pooled window by window to the anchor grid, then ``conv1x1 + BN``
   to ``d`` channels. The anchor itself is just ``conv1x1 + BN`` to ``d``.

The flattened stages (row-major over H, W: N = H_L W_L positions) then go through the transformer
variant's steps 2-5: cross attention from the anchor with ``+ I``, one shared gate, softmax over the
stages, ``O = A + BN(conv1x1(S))``, and ``conv1x1(ReLU(O))`` up to ``embed_size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unipt.train.methods.unipt.transformer import UniPTOutput, interact_and_aggregate, l1norm


def stride_ratios(grids: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(H_l / H_L, W_l / W_L)`` for every stage but the last; ValueError unless both are integers >= 1."""
    last_h, last_w = grids[-1]
    ratios = []
    for index, (h, w) in enumerate(grids[:-1]):
        if h < last_h or w < last_w or h % last_h or w % last_w:
            raise ValueError(
                f"UniPT's CNN variant needs every stage's grid to be an integer multiple of the last "
                f"stage's: stage {index} is {h}x{w}, the last is {last_h}x{last_w} "
                f"(ratio {h / last_h:g}x{w / last_w:g}); choose stages whose grids divide evenly"
            )
        ratios.append((h // last_h, w // last_w))
    return ratios


def flatten_map(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H*W, C], positions row-major over (H, W) like the cache's rows."""
    return x.flatten(2).transpose(1, 2)


class UniPTCNN(nn.Module):
    """The parallel network over CNN stages: ``channels[l]`` and ``grids[l] = (H_l, W_l)``, anchor last."""

    def __init__(
        self,
        channels: list[int],
        grids: list[tuple[int, int]],
        embed_size: int,
        downsample_factor: int = 2,
    ) -> None:
        super().__init__()
        if len(channels) < 2 or len(channels) != len(grids):
            raise ValueError("UniPT's CNN variant needs at least two stages, each with channels and a grid")
        d = embed_size // downsample_factor
        if d < 1:
            raise ValueError(f"embed_size {embed_size} // downsample_factor {downsample_factor} must be >= 1")
        self.grids = [tuple(g) for g in grids]
        self.ratios = stride_ratios(self.grids)
        self.channels = list(channels)
        self.embed_size = embed_size
        self.downsample = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.BatchNorm2d(d)) for c in channels
        )
        self.identity = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels[-1], c, kernel_size=1), nn.ReLU()) for c in channels[:-1]
        )
        self.gate = nn.Linear(d, 1)
        self.projection = nn.Sequential(nn.Conv2d(d, d, kernel_size=1), nn.BatchNorm2d(d))
        self.up = nn.Conv2d(d, embed_size, kernel_size=1)

    def reweighted(self, index: int, stage: Tensor, last: Tensor) -> Tensor:
        """Stage ``index`` weighted by its agreement with the anchor, sum-pooled to the anchor grid."""
        (rh, rw), (h, w) = self.ratios[index], self.grids[-1]
        guide = F.interpolate(self.identity[index](last), size=stage.shape[-2:], mode="nearest")
        scores = (guide * stage).sum(dim=1)  # [B, H_l, W_l]
        # [B, H_L, r_h, W_L, r_w]: one r_h x r_w window per anchor position, as unfold with stride r gives.
        windows = scores.view(-1, h, rh, w, rw).permute(0, 1, 3, 2, 4).reshape(-1, h, w, rh * rw)
        # The constant keeps every position in play when a window's scores are all <= 0.
        windows = l1norm(torch.relu(windows), dim=-1) + 1.0 / (rh * rw)
        weights = windows.view(-1, h, w, rh, rw).permute(0, 1, 3, 2, 4).reshape(-1, 1, h * rh, w * rw)
        return F.avg_pool2d(stage * weights, kernel_size=(rh, rw), divisor_override=1)

    def forward(self, maps: list[Tensor]) -> UniPTOutput:
        if len(maps) != len(self.downsample):
            raise ValueError(f"expected {len(self.downsample)} stage maps, got {len(maps)}")
        for x, c, g in zip(maps, self.channels, self.grids, strict=True):
            if tuple(x.shape[1:]) != (c, *g):
                raise ValueError(f"a stage map is {tuple(x.shape[1:])}, expected {(c, *g)} (C, H, W)")
        last = maps[-1]
        anchor_map = self.downsample[-1](last)  # [B, d, H_L, W_L]
        anchor = flatten_map(anchor_map)  # [B, N, d]
        others = torch.stack(
            [
                flatten_map(self.downsample[i](self.reweighted(i, stage, last)))
                for i, stage in enumerate(maps[:-1])
            ],
            dim=1,
        )  # [B, L, N, d]

        # Every position of a feature map is real: the interaction runs with an all-ones mask.
        everywhere = anchor.new_ones(anchor.shape[:2])
        aggregated, layer_weights = interact_and_aggregate(anchor, others, everywhere, self.gate)

        h, w = self.grids[-1]
        rolled = aggregated.transpose(1, 2).reshape(-1, aggregated.shape[-1], h, w)
        out = anchor_map + self.projection(rolled)
        return UniPTOutput(tokens=flatten_map(self.up(torch.relu(out))), layer_weights=layer_weights)


class UniPTCNNClassifier(nn.Module):
    """UniPT's CNN variant plus a classification head over the mean of its output at the anchor positions."""

    def __init__(
        self,
        channels: list[int],
        grids: list[tuple[int, int]],
        num_classes: int,
        embed_size: int,
        downsample_factor: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.unipt = UniPTCNN(channels, grids, embed_size, downsample_factor)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embed_size, num_classes)

    def forward(self, maps: list[Tensor], mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``mask`` is accepted for the training loop's sake: every position of a feature map is real."""
        out = self.unipt(maps)
        return self.classifier(self.dropout(out.tokens.mean(1))), out.layer_weights
