"""Which split each example goes to (``dataset.split``), and what repeats across the splits.

A seeded hash of a group puts every member of the group in one split. The group is
``split.group_column``'s value when set (the movie, for Rotten Tomatoes), else (scheme 2, the default)
a hash of the example's input content, so exact duplicates never straddle train and test. Scheme 1, kept
for old runs, hashed each example id instead. A dataset's own split column (``dataset.split_column``)
overrides all of this.
"""

from __future__ import annotations

import hashlib
from collections import Counter

from unipt.pipeline.config import DatasetConfig
from unipt.pipeline.data.raw_examples import RawExamples
from unipt.pipeline.errors import UniptError
from unipt.pipeline.log import log, say

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
}


def decide_splits(
    raw: RawExamples, ids: list[str], content_key: dict[str, str], scheme: int | None, config: DatasetConfig
) -> tuple[list[str], str]:
    """Each example's split, and how the split was decided (for the duplicates warning; empty when
    identical inputs always share a split). ``content_key`` maps an example id to its input's group;
    ``scheme`` is None when the data's own split column decides."""
    # What decides the split: the data's own split column, a group column, or (scheme 2) the content.
    if raw.splits is not None:
        splits = [_clean_split(split, index) for index, split in enumerate(raw.splits)]
        decided_by = (
            f"by dataset.split_column {config.split_column!r}; drop the duplicates or move each input's "
            "copies into one split"
        )
    elif scheme == 1:
        groups = [str(g) for g in raw.groups] if raw.groups is not None else ids
        splits = [assign_split(group, config) for group in groups]
        decided_by = (
            "by dataset.split.scheme 1; drop the duplicates, or set it to 2 to keep identical inputs "
            "in one split"
        )
    else:
        keys = [content_key[i] for i in ids]
        groups = _merge_groups([str(g) for g in raw.groups], keys) if raw.groups is not None else keys
        splits = [assign_split(group, config) for group in groups]
        decided_by = ""  # identical inputs always share a split: nothing can leak
    return splits, decided_by


def _merge_groups(groups: list[str], content_keys: list[str]) -> list[str]:
    """Groups joined wherever identical inputs sit in different groups (a snippet quoted for two
    movies), so that both rules hold: a group stays in one split, and so does every copy of an input.
    A merged group is named by its smallest member's name; a group that merges with none keeps its own
    name, and so its split."""
    parent = {g: g for g in groups}

    def root(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    first_group: dict[str, str] = {}
    for group, key in zip(groups, content_keys, strict=True):
        other = first_group.setdefault(key, group)
        a, b = root(group), root(other)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [root(g) for g in groups]


def duplicate_counts(rows: list[tuple], content_key: dict[str, str]) -> dict[str, int]:
    """How many inputs repeat, and how many val/test examples have an identical input in train."""
    copies = Counter(content_key[row[1]] for row in rows)
    in_train = {content_key[row[1]] for row in rows if row[0] == "train"}
    leaked = Counter(row[0] for row in rows if row[0] != "train" and content_key[row[1]] in in_train)
    return {
        "repeated_inputs": sum(1 for n in copies.values() if n > 1),
        "extra_copies": sum(n - 1 for n in copies.values()),
        "val_in_train": leaked.get("val", 0),
        "test_in_train": leaked.get("test", 0),
    }


def report_duplicates(duplicates: dict[str, int], source: str, decided_by: str) -> None:
    """One line when inputs repeat; a warning when identical inputs sit in train and in val/test."""
    if not duplicates["extra_copies"]:
        return
    leaked = duplicates["val_in_train"] + duplicates["test_in_train"]
    found = (
        f"dataset {source}: {duplicates['repeated_inputs']} inputs occur more than once "
        f"({duplicates['extra_copies']} extra copies)"
    )
    if not leaked:
        say(f"{found}; identical inputs share a split")
        return
    log.warning(
        f"{found}: {duplicates['test_in_train']} test and {duplicates['val_in_train']} val inputs also "
        f"occur in train, so their metrics overstate (split {decided_by})"
    )


def _clean_split(split: object, index: int) -> str:
    name = _SPLIT_ALIASES.get(str(split).strip().lower())
    if name is None:
        raise UniptError(f"row {index}: split {split!r} is not one of train/val/test (or validation/dev)")
    return name


def _unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) for the given parts: same input, same value, any machine."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(group: str, config: DatasetConfig) -> str:
    u = _unit_hash("split", config.split.seed, group)
    if u < config.split.train:
        return "train"
    if u < config.split.train + config.split.val:
        return "val"
    return "test"


def seeded_sample(rows: list[tuple], limit: int, seed: int) -> list[tuple]:
    ranked = sorted(range(len(rows)), key=lambda i: _unit_hash("sample", seed, rows[i][1]))
    return [rows[i] for i in sorted(ranked[:limit])]
