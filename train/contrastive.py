"""Cross-model retrieval from two caches of one dataset (e.g. an image and a text backbone).

Each side (query, gallery) gets its own UniPT over its own cache; the output tokens are mean-pooled
and projected into one shared, L2-normalised embedding space. Training minimises the symmetric
InfoNCE loss (query->gallery and gallery->query cross-entropy over the batch) with a learnable
temperature, as in CLIP. Example *i* of one cache matches example *i* of the other, so the caches
must hold the same examples in the same order (checked by example id).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.config import TrainConfig
from unipt.pipeline.errors import UniptError
from unipt.train.block_plan import plan_blocks
from unipt.train.loader import Batch, CacheBatches, to_device
from unipt.train.methods.unipt.transformer import UniPT, masked_mean
from unipt.train.metrics import match_ranks, retrieval_metrics_from_ranks

_INITIAL_TEMPERATURE = 0.07  # CLIP's
_MAX_LOGIT_SCALE = math.log(100.0)  # CLIP caps 1/temperature at 100 so training stays stable
_EVAL_CHUNK = 512  # similarity rows computed at once: memory O(chunk * split size), not split size**2


class RetrievalModel(nn.Module):
    """Two UniPTs, one per side, pooled and projected into a shared embedding; a learnable temperature."""

    def __init__(
        self,
        query_sizes: list[int],
        gallery_sizes: list[int],
        embed_size: int | None = None,
        downsample_factor: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        query_width, gallery_width = embed_size or query_sizes[-1], embed_size or gallery_sizes[-1]
        shared = embed_size or min(query_sizes[-1], gallery_sizes[-1])
        self.query = UniPT(query_sizes, query_width, downsample_factor)
        self.gallery = UniPT(gallery_sizes, gallery_width, downsample_factor)
        self.query_projection = nn.Linear(query_width, shared)
        self.gallery_projection = nn.Linear(gallery_width, shared)
        self.dropout = nn.Dropout(dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / _INITIAL_TEMPERATURE)))

    def embed(self, side: str, hidden: list[Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
        """L2-normalised [B, shared] embeddings of one side and its [B, L] layer weights."""
        unipt, projection = (
            (self.query, self.query_projection)
            if side == "query"
            else (self.gallery, self.gallery_projection)
        )
        out = unipt(hidden, mask)
        pooled = self.dropout(masked_mean(out.tokens, mask))
        return nn.functional.normalize(projection(pooled).float(), dim=-1), out.layer_weights

    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=_MAX_LOGIT_SCALE).exp()

    def forward(self, query: Batch, gallery: Batch, device: torch.device) -> Tensor:
        """[B, B] logits: query i against gallery j, scaled by 1 / temperature."""
        q, _ = self.embed("query", *to_device(query, device))
        g, _ = self.embed("gallery", *to_device(gallery, device))
        return self.scale() * q @ g.T


def contrastive_loss(logits: Tensor) -> Tensor:
    """Symmetric InfoNCE: the matching pair sits on the diagonal, in both directions."""
    targets = torch.arange(len(logits), device=logits.device)
    return (nn.functional.cross_entropy(logits, targets) + nn.functional.cross_entropy(logits.T, targets)) / 2


class PairedBatches:
    """The same examples, in the same order, from two caches: yields (query batch, gallery batch)."""

    def __init__(self, query: CacheBatches, gallery: CacheBatches, block_examples: int) -> None:
        if not np.array_equal(query.indices, gallery.indices):
            raise UniptError("query and gallery splits differ; extract both caches from the same dataset")
        # One block plan for both sides (cut wherever either side's rows are not back to back), so the
        # seeded shuffles, which depend only on block sizes, put the same example in the same place.
        offsets = [query.reader.offsets_for(layer) for layer in query.layers]
        offsets += [gallery.reader.offsets_for(layer) for layer in gallery.layers]
        blocks = plan_blocks(query.indices, offsets, block_examples)
        query.blocks, gallery.blocks = blocks, list(blocks)
        # Length grouping orders both sides by one set of lengths (the token side's), or they would part.
        shared = query.lengths if query.lengths is not None else gallery.lengths
        query.lengths = gallery.lengths = shared
        self.query, self.gallery = query, gallery

    def __len__(self) -> int:
        return len(self.query)

    def epoch(self, epoch: int = 0) -> Iterator[tuple[Batch, Batch]]:
        for q, g in zip(self.query.epoch(epoch), self.gallery.epoch(epoch), strict=True):
            if not np.array_equal(
                q.indices, g.indices
            ):  # cannot happen with one block plan; never train on it
                raise UniptError("query and gallery batches went out of step; this is a bug in unipt")
            yield q, g


def check_aligned(query: ActivationCache, gallery: ActivationCache) -> None:
    """Refuse two caches that do not hold the same examples (by id) in the same order and splits."""
    for column in ("example_id", "split"):
        a = query.examples.column(column).to_pylist()
        b = gallery.examples.column(column).to_pylist()
        if a != b:
            where = next(
                (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
            )
            raise UniptError(
                f"caches {query.source} and {gallery.source} hold different examples ({column} differs at "
                f"row {where}: {len(a)} vs {len(b)} examples); extract both from the same dataset config"
            )


def paired_batches(
    query: ActivationCache,
    gallery: ActivationCache,
    split: str,
    config: TrainConfig,
    seed: int,
    shuffle: bool,
) -> PairedBatches:
    def side(reader: ActivationCache) -> CacheBatches:
        return CacheBatches.for_split(reader, split, config, seed, shuffle)

    return PairedBatches(side(query), side(gallery), config.block_examples)


@torch.no_grad()
def evaluate_retrieval(model: RetrievalModel, data: PairedBatches, device: torch.device) -> dict[str, Any]:
    """R@1/5/10 (percent) query->gallery and gallery->query over the whole split, rSum, layer weights."""
    model.eval()
    if len(data) == 0:
        nan = float("nan")
        empty = {f"{d}_r{k}": nan for d in ("q2g", "g2q") for k in (1, 5, 10)}
        return {**empty, "rsum": nan, "query_layer_weights": [], "gallery_layer_weights": []}
    queries, galleries, query_weights, gallery_weights = [], [], [], []
    for q, g in data.epoch(0):
        emb, weights = model.embed("query", *to_device(q, device))
        queries.append(emb.float().cpu())
        query_weights.append(weights.float().cpu())
        emb, weights = model.embed("gallery", *to_device(g, device))
        galleries.append(emb.float().cpu())
        gallery_weights.append(weights.float().cpu())
    query, gallery = torch.cat(queries), torch.cat(galleries)
    metrics = retrieval_metrics_chunked(query, gallery)
    metrics["query_layer_weights"] = torch.cat(query_weights).mean(0).tolist()
    metrics["gallery_layer_weights"] = torch.cat(gallery_weights).mean(0).tolist()
    return metrics


def retrieval_metrics_chunked(query: Tensor, gallery: Tensor) -> dict[str, float]:
    """:func:`unipt.train.metrics.retrieval_metrics` of ``query @ gallery.T`` without holding the whole
    matrix."""
    ranks = []
    for a, b in ((query, gallery), (gallery, query)):
        chunks = [match_ranks(a[i : i + _EVAL_CHUNK] @ b.T, offset=i) for i in range(0, len(a), _EVAL_CHUNK)]
        ranks.append(torch.cat(chunks))
    return retrieval_metrics_from_ranks(*ranks)
