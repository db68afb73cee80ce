"""Each raw value a source gives checked and made canonical before it enters the normalized table:
texts (NFC, stripped, never empty), images (a shape that fits the pixels), labels (class names, or finite
numbers for regression). A bad row is one line naming the row and what to do."""

from __future__ import annotations

import math
import unicodedata
from collections import Counter

import numpy as np

from unipt.pipeline.config import DatasetConfig
from unipt.pipeline.data.raw_examples import RawExamples, TextPair
from unipt.pipeline.errors import UniptError

# What ``clean_inputs`` found: the kinds of input a table holds.
IMAGE_AND_TEXT, IMAGE, TEXT_PAIR, TEXT = "image+text", "image", "text_pair", "text"


def clean_inputs(raw: RawExamples, config: DatasetConfig) -> tuple[list, str]:
    """One cleaned value per example, and their kind: a text, an image, an (image, text) pair for
    image-text datasets, or a TextPair for text-pair datasets."""
    has_text, has_image = raw.texts is not None, raw.images is not None
    if not (raw.images if has_image else raw.texts):
        raise UniptError(f"dataset {config.source} has no examples; check the file and any filters")
    texts = [_clean_text(text, index) for index, text in enumerate(raw.texts)] if has_text else None
    images = [_clean_image(image, index) for index, image in enumerate(raw.images)] if has_image else None
    text_pairs = _clean_text_pairs(raw, config)
    if text_pairs is not None:
        return [TextPair(a, b) for a, b in zip(texts, text_pairs, strict=True)], TEXT_PAIR
    if texts is not None and images is not None:
        return list(zip(images, texts, strict=True)), IMAGE_AND_TEXT
    return (texts, TEXT) if texts is not None else (images, IMAGE)


def clean_labels(
    raw: RawExamples, config: DatasetConfig, task: str, regression: bool
) -> tuple[list, list[str]]:
    """(each example's label, the class names in natural order); regression labels are finite numbers
    and have no class names."""
    clean = _numeric_label if regression else _clean_label
    labels = [clean(label, index) for index, label in enumerate(raw.labels)]
    # Regression labels are values, not classes: no names, and the fingerprint hashes the numbers.
    label_names = [] if regression else sorted(set(labels), key=_natural_key)
    if not regression and len(label_names) < 2:
        raise UniptError(
            f"dataset {config.source} has a single label {label_names}; train.task {task} needs two or more"
        )
    return labels, label_names


def _clean_text(text: object, index: int, what: str = "text") -> str:
    if text is None or not isinstance(text, str):
        raise UniptError(f"row {index}: {what} is {text!r}, not a string; fill or drop rows without {what}")
    text = unicodedata.normalize("NFC", text).strip()
    if not text:
        raise UniptError(f"row {index}: {what} is empty; drop empty rows from the dataset")
    return text


def _clean_text_pairs(raw: RawExamples, config: DatasetConfig) -> list[str] | None:
    """The cleaned second texts of a text-pair dataset, or None; pairs need texts and take no images."""
    if raw.text_pairs is None:
        return None
    if raw.texts is None or raw.images is not None:
        raise UniptError(
            f"dataset {config.source}: dataset.text_pair_column pairs two texts, so it needs "
            "dataset.text_column and no dataset.image_column; set text_column, or drop text_pair_column"
        )
    return [_clean_text(text, index, "text_pair") for index, text in enumerate(raw.text_pairs)]


def _clean_image(image: object, index: int) -> dict:
    if not isinstance(image, dict) or not {"height", "width", "channels", "pixels"} <= set(image):
        raise UniptError(f"row {index}: image is not height/width/channels/pixels; drop or fix the row")
    shape = (image["height"], image["width"], image["channels"])
    if image["channels"] not in (1, 3) or min(shape) <= 0 or len(image["pixels"]) != np.prod(shape):
        raise UniptError(f"row {index}: image pixels do not match its shape {list(shape)} (uint8 H*W*C)")
    return image


def _clean_label(label: object, index: int) -> str:
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    text = "" if label is None or (isinstance(label, float) and math.isnan(label)) else str(label).strip()
    # CSV readers keep a string column's "NaN"/"nan" as text; pandas writes missing labels that way.
    if not text or text.lower() == "nan":
        raise UniptError(f"row {index}: label is missing (NaN/null/empty); fill or drop unlabelled rows")
    return text


def _numeric_label(label: object, index: int) -> float:
    try:
        value = float(label.strip() if isinstance(label, str) else label)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise UniptError(
            f"row {index}: label {label!r} is not a finite number; train.task regression needs a numeric "
            "label column (fill or drop the row)"
        )
    return value


def check_labels_seen_in_train(rows: list[tuple], source: str) -> None:
    """A label that only val/test hold cannot be learned, and is most often a typo or a stray value."""
    in_train = {row[3] for row in rows if row[0] == "train"}
    unseen = Counter(row[3] for row in rows if row[0] != "train" and row[3] not in in_train)
    if unseen:
        label, count = unseen.most_common(1)[0]
        others = f" (and {len(unseen) - 1} more)" if len(unseen) > 1 else ""
        raise UniptError(
            f"dataset {source}: label {label!r}{others} occurs in val/test ({count} rows) but never in "
            "train; fix or drop those rows, or give the class training examples"
        )


def _natural_key(name: str) -> tuple[int, float | str]:
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)
