"""Augmented views: what they are (the recipe), what they are called (input hashes), which one is read.

``extract.views: K`` stores K views of every training example: view 0 is the input as is, views 1..K-1
are seeded augmentations of it (VSE-infinity's recipe, :data:`RECIPE`; the operations themselves run in
the extraction workers, :mod:`unipt.extract.augment`). An augmented view is just another *input* of the
activation space: its input hash names (the original's hash, the recipe, the seed, the view number), so
its rows live in the space's segments like any input's, and view 0 is the original input itself (a
K=4 extraction after a K=1 one extracts only views 1..3). The dataset version's view maps every example
to its K row ranges (:mod:`unipt.pipeline.cache.space`); val and test examples are never augmented (their
views 1..K-1 name view 0's rows), and training reads view ``(epoch + seed) mod K``
(:meth:`unipt.pipeline.cache.activation_cache.ActivationCache.view`,
:class:`unipt.train.loader.CacheBatches`).
"""

from __future__ import annotations

from typing import Any

from unipt.pipeline.config import ExtractConfig
from unipt.pipeline.hashing import sha256_json

TRAIN_SPLIT = "train"  # the only split whose examples are augmented

# VSE-infinity (Chen et al., CVPR 2021; its data.py): torchvision's RandomResizedCrop(scale=(0.6, 1.0))
# and RandomHorizontalFlip for images; for texts each word piece (special tokens excepted) is, with
# probability 0.2, masked (half of those), replaced by a random vocabulary token (a tenth) or deleted
# (the rest). Any change here changes every augmented view's identity: bump ``name``.
RECIPE: dict[str, Any] = {
    "name": "vse-infinity-v1",
    "image": {"crop_scale": [0.6, 1.0], "crop_ratio": [3 / 4, 4 / 3], "flip": 0.5},
    "text": {"noise": 0.2, "mask": 0.5, "replace": 0.1, "delete": 0.4},
}


def views_key_field(extract: ExtractConfig) -> dict[str, Any] | None:
    """What the cache key adds for augmented views; None for ``views: 1``, so those keys stay as they were."""
    if extract.views == 1:
        return None
    return {"count": extract.views, "seed": extract.view_seed, "recipe": RECIPE}


def view_hash(input_hash: str, view: int, seed: int) -> str:
    """The input hash of view ``view`` of the input ``input_hash``: the input itself for view 0."""
    if view == 0:
        return input_hash
    return sha256_json({"input": input_hash, "recipe": RECIPE, "seed": seed, "view": view})


def augmented_hashes(hashes: list[str], splits: list[str], views: int, seed: int) -> list[list[str]]:
    """For views 1..views-1, every example's input hash: an augmented view for train examples, the
    original input (view 0) for the others, which are never augmented."""
    pairs = list(zip(hashes, splits, strict=True))
    return [[view_hash(h, k, seed) if s == TRAIN_SPLIT else h for h, s in pairs] for k in range(1, views)]


def view_for_epoch(epoch: int, seed: int, views: int) -> int:
    """The view training reads in ``epoch`` (every example the same one, so reads stay block-contiguous)."""
    return (epoch + seed) % views
