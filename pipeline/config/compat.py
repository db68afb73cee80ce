"""Every rule about configs written by an older unipt, in one place: :func:`upgrade`.

A config written by an earlier version may name a setting differently, or lack one added since.
``upgrade(raw, stored=...)`` turns such a mapping into one this version validates, and computes with
what the older version computed. The rules, in the order they apply:

Old names, in any config (a YAML file, ``--set``, a run record, a checkpoint, a sweep's state):

1. ``train.linear_probe`` is ``train.probe_baseline`` (:data:`RENAMED`): the old name collided with
   ``train.method: linear_probe``, a method, while the setting adds a baseline to the report.
2. ``train.amp: bf16`` / ``fp16`` are ``bfloat16`` / ``float16`` (:data:`AMP_ALIASES`), the dtype words of
   ``extract.dtype`` and ``extract.autocast``.

A file or override written with an old name loads with a deprecation warning naming the new one; a stored
config (``stored=True``) was written by unipt itself, so it loads without one.

Settings a stored config lacks (:data:`BEFORE_IT_EXISTED`). unipt stores every setting it has (a run
record's config, a checkpoint's training settings, a sweep's state), so one that is missing did not
exist yet, and the run computed what the version before it computed; a YAML file that lacks one gets
today's default instead:

3. ``dataset.split.scheme: 1``: examples were split by id, not by a hash of their content.
4. ``train.length_grouping: false``: batches were cut in plain shuffled order.
5. ``train.loader_memory_mb: null``: blocks held ``block_examples`` examples whatever their bytes.
6. ``train.view_order: 1``: a view's examples were read in the dataset's order (split, then id).

The settings a cache's key fields lack (:func:`upgrade_key_fields`): a cache records the settings that
decided its bytes, and one made before a setting existed computed what that version did:

7. ``autocast: none``: the backbone ran in float32.
8. ``dtype``, ``max_length``: the stored arrays' dtype and the layout's tokens per text.
9. ``layers: all``: every hidden state.

Compatibility that is not a config rule stays with the code it concerns: the cache formats this version
reads (:data:`unipt.pipeline.READABLE_FORMAT_VERSIONS`: 2, 3 and 4, by
:mod:`unipt.pipeline.cache.reader`); the cache key's ``views`` field, absent for one view so keys made
before views stay (:func:`unipt.pipeline.cache.identity.cache_key_fields`); and the block plans of runs
made before the loader held fewer blocks (``unipt.train.loader.BUDGETED_PREFETCH_BLOCKS``).
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

from unipt.pipeline.errors import UniptError

RENAMED: dict[tuple[str, str], str] = {("train", "linear_probe"): "probe_baseline"}
AMP_ALIASES = {"bf16": "bfloat16", "fp16": "float16"}
BEFORE_IT_EXISTED: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("dataset", "split", "scheme"), 1),
    (("train", "length_grouping"), False),
    (("train", "loader_memory_mb"), None),
    (("train", "view_order"), 1),
)


def upgrade(raw: dict[str, Any], *, stored: bool = False) -> dict[str, Any]:
    """A copy of the config ``raw`` with the rules above applied; ``stored``: unipt wrote it (a run record,
    a checkpoint, a sweep's state), so a setting it lacks did not exist when it was written."""
    raw = copy.deepcopy(raw)
    for (section, old), new in RENAMED.items():
        node = raw.get(section)
        if isinstance(node, dict) and old in node:
            if new in node:
                raise UniptError(
                    f"{section}.{old} and {section}.{new} are one setting (its old and its new name); "
                    f"keep only {section}.{new}"
                )
            if not stored:
                _deprecated(f"{section}.{old} is deprecated; write {section}.{new} (the same setting)")
            node[new] = node.pop(old)
    train = raw.get("train")
    if isinstance(train, dict) and "amp" in train:
        train["amp"] = amp_word(train["amp"], warn=not stored)
    if stored:
        for path, value in BEFORE_IT_EXISTED:
            node = raw
            for part in path[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    break  # not a mapping: validation says so
            else:
                node.setdefault(path[-1], value)
    return raw


def current_key(key: str) -> str:
    """A dotted setting's name today (``train.linear_probe`` -> ``train.probe_baseline``, said so), for
    flags that name one setting outside a config (``--grid``, ``--sample``)."""
    section, _, name = key.partition(".")
    new = RENAMED.get((section, name))
    if new is None:
        return key
    _deprecated(f"{key} is deprecated; write {section}.{new} (the same setting)")
    return f"{section}.{new}"


def upgrade_key_fields(fields: dict[str, Any], *, dtype: str, max_length: int) -> dict[str, Any]:
    """A copy of a cache's key ``fields`` with rules 7-9 applied; ``dtype`` and ``max_length`` are what its
    store says (its arrays' dtype, its layout). Its key is the hash of the fields as written, not these."""
    return {"layers": "all", "max_length": max_length, "dtype": dtype, "autocast": "none"} | fields


def amp_word(amp: Any, *, warn: bool = True) -> Any:
    """``train.amp``'s dtype word for an old spelling (``bf16`` -> ``bfloat16``); any other value as is.
    The config's validator calls it too, for values that come from Python rather than a file."""
    if not (isinstance(amp, str) and amp in AMP_ALIASES):
        return amp
    word = AMP_ALIASES[amp]
    if warn:
        _deprecated(f"train.amp {amp!r} is deprecated; write {word!r} (the word extract.dtype uses)")
    return word


def _deprecated(message: str) -> None:
    warnings.warn(message, DeprecationWarning, stacklevel=3)
    # DeprecationWarning is hidden by default outside __main__ and tests; the user sees the log line.
    logging.getLogger("unipt").warning(message)
