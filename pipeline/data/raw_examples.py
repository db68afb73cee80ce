"""The rows a dataset source gives before normalization: what every reader (files, bundled sets,
Hugging Face datasets) returns and :func:`unipt.pipeline.data.table.normalize` turns into the normalized
table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class TextPair(NamedTuple):
    """One example of a text-pair dataset: what a text backbone encodes as ``tokenizer(text, text_pair)``."""

    text: str
    text_pair: str


@dataclass
class RawExamples:
    texts: list[str] | None
    labels: list[str]
    ids: list[str] | None = None
    groups: list[str] | None = None
    splits: list[str] | None = None
    images: list[dict] | None = None  # image datasets: column values of unipt.pipeline.data.images.IMAGE_TYPE
    text_pairs: list[str] | None = None  # text-pair datasets: each example's second text
