"""Load a dataset into one normalized table and give it a content fingerprint.

Every source (bundled dataset, CSV, JSONL, Parquet) becomes a pyarrow table with columns
``example_id, text, label, split``, sorted by split then id. Image datasets (``bundled:mnist_5k``,
or a file with ``dataset.image_column``) have an ``image`` column instead of ``text`` (raw uint8
pixels with their shape, see ``pipeline/data/images.py``); image-text datasets (both columns set) have
both, one pair per example, for a text and an image backbone over the same examples. Text-pair
datasets (``dataset.text_pair_column``, or ``bundled:rt_same_movie``) add a ``text_pair`` column: each
example is the pair (text, text_pair), which a text backbone encodes as its tokenizer encodes pairs.
``DatasetTable.input_kind`` says which. The fingerprint hashes that
table's content (for images: every image's shape and pixels), so it does not depend on file order
or format, and it covers the split assignment: training on a cache built from another version of
the data is impossible without the fingerprint (and so the cache key) changing.

Split assignment (``dataset.split``): a seeded hash of a group puts every member of the group in one
split. The group is ``split.group_column``'s value when set (the movie, for Rotten Tomatoes), else
(scheme 2, the default) a hash of the example's input content, so exact duplicates never straddle
train and test. Scheme 1, kept for old runs, hashed each example id instead; the fingerprint of a
content-grouped table names its scheme, so the two never share a cache.

The steps live beside this module: the readers (``bundled_sets.py``, ``files.py``, ``hf.py``), the
checks of each raw value (``cleaning.py``), the split rules (``splits.py``) and the fingerprint
(``fingerprint.py``); here is the order they run in, and what identifies each example's input.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from unipt.pipeline.config import DatasetConfig
from unipt.pipeline.data.bundled import is_bundled
from unipt.pipeline.data.bundled_sets import read_bundled
from unipt.pipeline.data.cleaning import (
    IMAGE,
    IMAGE_AND_TEXT,
    TEXT_PAIR,
    check_labels_seen_in_train,
    clean_inputs,
    clean_labels,
)
from unipt.pipeline.data.files import read_table_file
from unipt.pipeline.data.fingerprint import image_table_fingerprint, table_fingerprint
from unipt.pipeline.data.hf import is_hf_source
from unipt.pipeline.data.images import IMAGE_COLUMN, IMAGE_TYPE, image_digest
from unipt.pipeline.data.raw_examples import RawExamples, TextPair
from unipt.pipeline.data.splits import (
    SPLITS,
    decide_splits,
    duplicate_counts,
    report_duplicates,
    seeded_sample,
)
from unipt.pipeline.errors import UniptError
from unipt.pipeline.hashing import canonical_json
from unipt.pipeline.tasks import get_task

TEXT_PAIR_COLUMN = "text_pair"


@dataclass(frozen=True)
class DatasetTable:
    """A normalized dataset: ``table`` columns are example_id, text (or image), label (int), split."""

    table: pa.Table
    label_names: list[str]
    fingerprint: str
    source: str
    # Identical inputs: how many repeat, and how many val/test examples also occur in train (a leak).
    duplicates: dict[str, int] | None = None
    split_scheme: int | None = None  # 2 or 1 when content/ids decided the split; None: a column did

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def input_kind(self) -> str:
        """``"image"`` or ``"text"``; ``"image+text"`` for image-text pairs (both columns)."""
        if IMAGE_COLUMN not in self.table.column_names:
            return "text"
        return "image+text" if "text" in self.table.column_names else "image"

    @property
    def input_columns(self) -> list[str]:
        """The columns backbones read: ``["text"]``, ``["image"]`` or both (each backbone takes its kind);
        text-pair datasets add ``text_pair`` (a text backbone reads both)."""
        return [c for c in (IMAGE_COLUMN, "text", TEXT_PAIR_COLUMN) if c in self.table.column_names]

    def split_counts(self) -> dict[str, int]:
        counts = Counter(self.table.column("split").to_pylist())
        return {split: counts.get(split, 0) for split in SPLITS}

    def class_counts(self) -> dict[str, dict[str, int]] | None:
        """Examples per class name in each split (None for numeric labels)."""
        if not self.label_names:
            return None
        pairs = zip(
            self.table.column("split").to_pylist(), self.table.column("label").to_pylist(), strict=True
        )
        counts = Counter(pairs)
        return {
            split: {name: counts.get((split, i), 0) for i, name in enumerate(self.label_names)}
            for split in SPLITS
        }

    def check_splits(self) -> None:
        """Refuse a table with an empty split: the best epoch (and the probe's regularisation) is chosen
        on val, and test is what the run reports; an empty one would make either a NaN."""
        counts = self.split_counts()
        for split, why in (
            ("train", "there is nothing to train on"),
            ("val", "the best epoch is chosen on validation examples"),
            ("test", "the run reports metrics on test examples"),
        ):
            if counts[split] == 0:
                sizes = ", ".join(f"{name} {n}" for name, n in counts.items())
                raise UniptError(
                    f"dataset {self.source} gives an empty {split} split ({sizes}) and {why}; raise "
                    f"dataset.limit, set a dataset.split.{split} fraction such as 0.1, or give a "
                    f"dataset.split_column with {split} rows"
                )


def load_dataset(config: DatasetConfig, task: str = "classification") -> DatasetTable:
    """``task`` is ``train.task``: a task with numeric labels (regression) keeps them as float64."""
    if config.source == "bundled:rt_movie_score" and get_task(task).label_kind != "numeric":
        # Its labels are numbers; read as class names they would give hundreds of one-movie "classes".
        raise UniptError(
            f"bundled:rt_movie_score has numeric labels (each movie's share of fresh reviews) and "
            f"train.task {task} reads class names; set train.task: regression"
        )
    raw = _read_source(config)
    return normalize(raw, config, task)


def _read_source(config: DatasetConfig) -> RawExamples:
    if is_bundled(config.source):
        return read_bundled(config)
    if is_hf_source(config.source):  # hf:NAME[:CONFIG], hf-disk:PATH (Hugging Face datasets, an extra)
        from unipt.pipeline.data.hf import read_hf_source

        return read_hf_source(config)
    if config.revision is not None:
        raise UniptError(f"dataset.revision applies to hf:NAME sources, not {config.source}; drop it")
    return read_table_file(Path(config.source), config)


def normalize(raw: RawExamples, config: DatasetConfig, task: str = "classification") -> DatasetTable:
    """The normalized table of a source's rows: each value cleaned, ids given, splits decided, rows
    sorted (and sampled to ``dataset.limit``), duplicates reported, then the table and its fingerprint."""
    inputs, kind = clean_inputs(raw, config)
    regression = get_task(task).label_kind == "numeric"
    labels, label_names = clean_labels(raw, config, task, regression)
    contents = [_content_of(x) for x in inputs]
    ids = _example_ids(raw, contents, labels, config)
    content_key = {
        i: _content_group(_group_content(x, c)) for i, x, c in zip(ids, inputs, contents, strict=True)
    }
    scheme = None if raw.splits is not None else config.split.scheme
    splits, decided_by = decide_splits(raw, ids, content_key, scheme, config)

    label_index = {name: i for i, name in enumerate(label_names)}
    rows = sorted(zip(splits, ids, inputs, labels, strict=True), key=lambda r: (SPLITS.index(r[0]), r[1]))
    if config.limit is not None and config.limit < len(rows):
        rows = seeded_sample(rows, config.limit, config.split.seed)
    if not regression:
        check_labels_seen_in_train(rows, config.source)
    duplicates = duplicate_counts(rows, content_key)
    report_duplicates(duplicates, config.source, decided_by)

    # Scheme 1 tables keep the header they always had, so old runs keep their fingerprint (and cache).
    # A group column's groups keep their split unless duplicates merge them, so such a table keeps its
    # fingerprint when nothing moved; a content-grouped table is new in scheme 2 and says so.
    content_grouped = scheme == 2 and raw.groups is None
    extra = {"split_scheme": scheme} if content_grouped else {}
    columns, fingerprint = _input_columns(rows, kind, label_names, extra)
    table = pa.table(
        {
            "example_id": pa.array([r[1] for r in rows], pa.string()),
            **columns,
            "label": (
                pa.array([r[3] for r in rows], pa.float64())
                if regression
                else pa.array([label_index[r[3]] for r in rows], pa.int64())
            ),
            "split": pa.array([r[0] for r in rows], pa.string()),
        }
    )
    return DatasetTable(
        table=table,
        label_names=label_names,
        fingerprint=fingerprint,
        source=config.source,
        duplicates=duplicates,
        split_scheme=scheme,
    )


def _example_ids(raw: RawExamples, contents: list[str], labels: list, config: DatasetConfig) -> list[str]:
    """The source's ids (``dataset.id_column``), which must be unique, or ids derived from content."""
    if raw.ids is not None:
        ids = [str(i) for i in raw.ids]
    else:
        ids = _content_ids(contents, labels)
    repeated_ids = [i for i, n in Counter(ids).items() if n > 1]
    if repeated_ids:
        raise UniptError(
            f"dataset {config.source}: id {repeated_ids[0]!r} appears more than once in column "
            f"{config.id_column!r} ({len(repeated_ids)} repeated ids); ids must be unique: fix that column, "
            "or set dataset.id_column: null to derive ids from each example's content"
        )
    return ids


def _input_columns(
    rows: list[tuple], kind: str, label_names: list[str], extra: dict
) -> tuple[dict[str, pa.Array], str]:
    """The input columns of the sorted ``rows`` (inputs of ``kind``), and the table's fingerprint."""
    columns: dict[str, pa.Array] = {}
    if kind == IMAGE_AND_TEXT:
        fingerprint = image_table_fingerprint(rows, label_names, with_text=True, extra=extra)
        columns[IMAGE_COLUMN] = pa.array([r[2][0] for r in rows], IMAGE_TYPE)
        columns["text"] = pa.array([r[2][1] for r in rows], pa.string())
    elif kind == IMAGE:
        fingerprint = image_table_fingerprint(rows, label_names, extra=extra)
        columns[IMAGE_COLUMN] = pa.array([r[2] for r in rows], IMAGE_TYPE)
    elif kind == TEXT_PAIR:
        # The header names the pair column, so no pair table shares a fingerprint with a single-text one.
        fingerprint = table_fingerprint(rows, label_names, extra=extra, columns=("text", TEXT_PAIR_COLUMN))
        columns["text"] = pa.array([r[2].text for r in rows], pa.string())
        columns[TEXT_PAIR_COLUMN] = pa.array([r[2].text_pair for r in rows], pa.string())
    else:
        fingerprint = table_fingerprint(rows, label_names, extra=extra)
        columns["text"] = pa.array([r[2] for r in rows], pa.string())
    return columns, fingerprint


def _content_of(value: str | dict | tuple) -> str:
    """A text, an image's digest, or both for a pair: what content-derived ids hash.

    A text pair is ``\x1e`` and the JSON list of its two texts: the JSON keeps (a, b) apart from (b, a)
    and from any other split of the same characters, and the leading ``\x1e`` (whitespace to
    ``str.strip``, so no cleaned text starts with it) keeps it apart from every single text."""
    if isinstance(value, TextPair):
        return "\x1e" + canonical_json(list(value))
    if isinstance(value, tuple):
        return f"{image_digest(value[0])}\x1f{value[1]}"
    return image_digest(value) if isinstance(value, dict) else value


def _group_content(value: object, content: str) -> str:
    """What a split group hashes: the content, but for a text pair each text with its whitespace runs
    made single spaces first (the JSON of the pair escapes newlines, which _content_group cannot see)."""
    if isinstance(value, TextPair):
        return _content_of(TextPair(*(" ".join(text.split()) for text in value)))
    return content


def _content_group(content: str) -> str:
    """The split group of an input: identical content (up to runs of whitespace, which no tokenizer
    sees) gives the same group, so duplicates share a split."""
    return hashlib.sha256(" ".join(content.split()).encode("utf-8")).hexdigest()


def input_hashes(table: pa.Table) -> list[str]:
    """Each example's input identity for the activation cache: the sha256 of exactly what a backbone
    reads (the text, the image's digest, or both for an image-text pair; see :func:`_content_of`).

    Unlike the split group (:func:`_content_group`), whitespace counts here: it decides no split, but
    some tokenizers (byte-level BPE) see it, and two inputs may share rows only if their bytes agree.
    """
    if TEXT_PAIR_COLUMN in table.column_names:
        return [hashlib.sha256(_content_of(pair).encode("utf-8")).hexdigest() for pair in text_pairs(table)]
    columns = [c for c in (IMAGE_COLUMN, "text") if c in table.column_names]
    values = [table.column(c).to_pylist() for c in columns]
    inputs = zip(*values, strict=True) if len(values) > 1 else ((v,) for v in values[0])
    return [
        hashlib.sha256(_content_of(row if len(row) > 1 else row[0]).encode("utf-8")).hexdigest()
        for row in inputs
    ]


def text_pairs(table: pa.Table) -> list[TextPair]:
    """Each example's (text, text_pair) of a text-pair table."""
    firsts, seconds = table.column("text").to_pylist(), table.column(TEXT_PAIR_COLUMN).to_pylist()
    return [TextPair(a, b) for a, b in zip(firsts, seconds, strict=True)]


def backbone_inputs(table: pa.Table, column: str) -> list:
    """What a backbone reading ``column`` encodes: its values, or (text, text_pair) tuples for a text
    backbone over a text-pair table."""
    if TEXT_PAIR_COLUMN not in table.column_names:
        return table.column(column).to_pylist()
    if column != "text":
        raise UniptError(
            f"the dataset holds text pairs (dataset.text_pair_column) but the backbone reads {column}s; "
            "use a text backbone, or drop dataset.text_pair_column"
        )
    return [tuple(pair) for pair in text_pairs(table)]


def _content_ids(texts: list[str], labels: list[str]) -> list[str]:
    """Ids derived from content so they survive reordering; exact duplicates get a suffix."""
    seen: Counter[str] = Counter()
    ids = []
    for text, label in zip(texts, labels, strict=True):
        base = hashlib.sha256(f"{label}\x1f{text}".encode()).hexdigest()[:16]
        ids.append(base if seen[base] == 0 else f"{base}-{seen[base]}")
        seen[base] += 1
    return ids
