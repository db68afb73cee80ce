"""A normalized table's content fingerprint: the sha256 of a header (its columns, class names and split
scheme) and every row in order, so it does not depend on file order or format, and it covers the split
assignment: training on a cache built from another version of the data is impossible without the
fingerprint (and so the cache key) changing. Images count as their shape and the sha256 of their pixels."""

from __future__ import annotations

import hashlib

from unipt.pipeline.data.images import image_digest
from unipt.pipeline.hashing import canonical_json


def table_fingerprint(
    rows: list[tuple], label_names: list[str], extra: dict | None = None, columns: tuple[str, ...] = ("text",)
) -> str:
    digest = hashlib.sha256()
    header = {"columns": ["split", "example_id", *columns, "label"], "labels": label_names, **(extra or {})}
    digest.update(canonical_json(header).encode("utf-8"))
    for row in rows:
        digest.update(canonical_json(list(row)).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def image_table_fingerprint(
    rows: list[tuple], label_names: list[str], with_text: bool = False, extra: dict | None = None
) -> str:
    """Like ``table_fingerprint``, with each image as its shape and the sha256 of its pixels (and its
    text, for image-text pairs)."""
    digest = hashlib.sha256()
    header = {
        "columns": ["split", "example_id", "image", *(["text"] if with_text else []), "label"],
        "image": "sha256 of HxWxC and uint8 pixels",
        "labels": label_names,
        **(extra or {}),
    }
    digest.update(canonical_json(header).encode("utf-8"))
    for split, example_id, value, label in rows:
        content = [image_digest(value[0]), value[1]] if with_text else [image_digest(value)]
        digest.update(canonical_json([split, example_id, *content, label]).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
