"""The augmentations of :data:`unipt.pipeline.data.augment.RECIPE`, run in the extraction workers.

Every augmented view draws from its own generator, seeded by its input hash (which names the original
input, the recipe, ``extract.view_seed`` and the view number), so a view is the same bytes whichever
worker, shard or run extracts it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from unipt.pipeline.data.augment import RECIPE
from unipt.pipeline.data.images import image_array, make_image
from unipt.pipeline.errors import UniptError


def view_rng(view_hash: str) -> np.random.Generator:
    """The generator of one augmented view (named by its input hash)."""
    return np.random.default_rng(int(view_hash, 16))  # SeedSequence takes all 256 bits


# --- images ---------------------------------------------------------------------------------------------


def crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: (top, left, h, w) covering a uniform 0.6-1.0 of
    the area at a log-uniform aspect ratio in [3/4, 4/3]; after 10 misses, the largest centred crop of
    a ratio in range."""
    lo, hi = RECIPE["image"]["crop_scale"]
    ratio = RECIPE["image"]["crop_ratio"]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(lo, hi)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def augment_image(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop (then flipped left-right with probability 0.5) of uint8 ``[H, W, C]`` pixels. The
    backbone resizes it to its input size as it does every image: together a RandomResizedCrop."""
    top, left, h, w = crop_box(pixels.shape[0], pixels.shape[1], rng)
    crop = pixels[top : top + h, left : left + w]
    if rng.random() < RECIPE["image"]["flip"]:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def augment_images(images: Sequence[Any], views: Sequence[str | None]) -> list[Any]:
    """``images`` with each one that has a view hash replaced by that augmented view (an image dict)."""
    return [
        image if view is None else make_image(augment_image(image_array(image), view_rng(view)))
        for image, view in zip(images, views, strict=True)
    ]


# --- texts ----------------------------------------------------------------------------------------------


def noise_tokens(
    ids: Sequence[int],
    rng: np.random.Generator,
    special_ids: set[int],
    mask_id: int,
    vocab_size: int,
) -> list[int]:
    """``ids`` with VSE-infinity's caption noise: each
    word piece that is not a special token is, with probability 0.2, masked (half of those), replaced by
    a random non-special vocabulary token (a tenth) or deleted (the rest).

    Returns one entry per input position: the new id, or -1 where the token is deleted.
    """
    text = RECIPE["text"]
    out = []
    for token in ids:
        draw = rng.random()
        if token in special_ids or draw >= text["noise"]:
            out.append(int(token))
            continue
        which = draw / text["noise"]  # uniform in [0, 1) again: splits the noised tokens 50/10/40
        if which < text["mask"]:
            out.append(mask_id)
        elif which < text["mask"] + text["replace"]:
            out.append(_random_token(rng, special_ids, vocab_size))
        else:
            out.append(-1)
    return out


def _random_token(rng: np.random.Generator, special_ids: set[int], vocab_size: int) -> int:
    while True:
        token = int(rng.integers(vocab_size))
        if token not in special_ids:
            return token


def noise_encoding(
    encoded: dict[str, list[list[int]]],
    views: Sequence[str | None],
    special_ids: set[int],
    mask_id: int | None,
    vocab_size: int,
) -> dict[str, list[list[int]]]:
    """A tokenizer's output (``input_ids`` and the per-token lists beside it, one list per text) with the
    token noise applied to each text that has a view hash; a deleted token leaves every list."""
    if mask_id is None:
        raise UniptError(
            "extract.views > 1 masks tokens, but this backbone's tokenizer has no mask token; use a "
            "tokenizer with one (BERT, RoBERTa, MiniLM) or set extract.views: 1"
        )
    out = {key: list(values) for key, values in encoded.items()}
    for i, view in enumerate(views):
        if view is None:
            continue
        noised = noise_tokens(encoded["input_ids"][i], view_rng(view), special_ids, mask_id, vocab_size)
        kept = [p for p, token in enumerate(noised) if token >= 0]
        for key in out:
            values = noised if key == "input_ids" else encoded[key][i]
            out[key][i] = [values[p] for p in kept]
    return out
