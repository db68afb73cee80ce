"""Does a cache hold the dataset's labels? A check before training.

A cache's manifest (``checksums.json``) is unkeyed: it catches accidents (bit rot, truncation, a partial
write), not a deliberate edit whose author reseals the manifest. Two cheap checks close most of that gap
(``docs/integrity.md``): the root digest registered runs read (:mod:`unipt.pipeline.runs.registered`), and
here a view's **labels and splits** (and example ids), compared with the dataset table when the data is
here: a view relabelled and resealed would otherwise train quietly on the wrong labels.
"""

from __future__ import annotations

import numpy as np

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.data.table import DatasetTable
from unipt.pipeline.errors import UniptError

_COMPARED = ("example_id", "split", "label")  # cheap columns every cache's examples table has


def check_examples_match(dataset: DatasetTable, reader: ActivationCache) -> None:
    """Refuse a cache whose example ids, splits, labels or class names differ from the dataset table's
    (the cache's fingerprint names the data, but its examples table is a separate file)."""
    cached, table = reader.examples, dataset.table
    fix = "delete the cache and run `unipt extract` (or `unipt run`) to write it again from the data"
    if cached.num_rows != table.num_rows:
        raise UniptError(
            f"cache {reader.source} holds {cached.num_rows} examples, the dataset {table.num_rows}; {fix}"
        )
    if "example_id" in cached.column_names and "example_id" in table.column_names:
        # A view may list its examples in another order (train.view_order 2): compare them id by id.
        cached, table = cached.sort_by("example_id"), table.sort_by("example_id")
    for column in _COMPARED:
        if column not in cached.column_names or column not in table.column_names:
            continue
        mine = table.column(column).to_numpy(zero_copy_only=False)
        theirs = cached.column(column).to_numpy(zero_copy_only=False)
        differ = np.flatnonzero(np.asarray(mine != theirs, dtype=bool))
        if len(differ):
            where = int(differ[0])
            raise UniptError(
                f"cache {reader.source} disagrees with dataset {dataset.source} on the {column} of example "
                f"{where} ({theirs[where]!r} != {mine[where]!r}): its examples table was changed; {fix}"
            )
    if dataset.label_names and list(reader.label_names) != list(dataset.label_names):
        raise UniptError(
            f"cache {reader.source} names the classes {reader.label_names}, dataset {dataset.source} "
            f"{dataset.label_names}; {fix}"
        )


def check_label_range(reader: ActivationCache) -> None:
    """Refuse class labels outside the cache's class names: the head is sized by the names, so such a label
    would index past it (or, enormous, size a one-hot) instead of failing in one line."""
    if not reader.label_names or "label" not in reader.examples.column_names:
        return
    labels = reader.examples.column("label").to_numpy(zero_copy_only=False)
    if len(labels) and not (
        np.issubdtype(labels.dtype, np.integer)
        and 0 <= labels.min()
        and labels.max() < len(reader.label_names)
    ):
        raise UniptError(
            f"cache {reader.source} has labels outside its {len(reader.label_names)} class names "
            f"(from {labels.min()!r} to {labels.max()!r}); run `unipt cache verify {reader.source}` and "
            "re-extract it"
        )
