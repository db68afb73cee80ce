"""Content addressing: the dataset fingerprint and the cache key change exactly when their inputs do."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import make_sentiment_rows, write_csv
from unipt.pipeline.cache.identity import BackboneIdentity, backbone_identity, cache_key, cache_key_fields
from unipt.pipeline.config import BackboneConfig, DatasetConfig, ExtractConfig, names_affecting
from unipt.pipeline.data.table import load_dataset


def _fingerprint(path, **settings) -> str:
    return load_dataset(DatasetConfig(source=str(path), id_column="id", **settings)).fingerprint


def test_one_fingerprint_for_every_format_order_and_column_layout(tmp_path):
    rows = make_sentiment_rows(60, seed=3)
    csv = write_csv(tmp_path / "a.csv", rows)
    shuffled = write_csv(tmp_path / "shuffled.csv", rows[31:] + rows[:31][::-1])
    # Columns in another order plus one the experiment does not use: same examples, same fingerprint.
    reordered = write_csv(tmp_path / "cols.csv", [{"note": "x", "label": r["label"], **r} for r in rows])
    tsv = tmp_path / "a.tsv"
    tsv.write_text("id\ttext\tlabel\n" + "".join(f"{r['id']}\t{r['text']}\t{r['label']}\n" for r in rows))
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows[7:] + rows[:7]), parquet)
    prints = {_fingerprint(p) for p in (csv, shuffled, reordered, tsv, jsonl, parquet)}
    assert len(prints) == 1


def test_each_change_to_the_data_or_its_split_gives_a_new_fingerprint(tmp_path):
    rows = make_sentiment_rows(60, seed=3)
    base = _fingerprint(write_csv(tmp_path / "a.csv", rows))
    relabelled = [dict(r) for r in rows]
    relabelled[4]["label"] = "neg" if rows[4]["label"] == "pos" else "pos"
    extra_row = [*rows, {"id": "r9999", "text": "a brilliant film", "label": "pos"}]
    dropped = rows[:-1]
    renamed = [dict(r) for r in rows]
    renamed[9]["id"] = "r9998"
    variants = [
        _fingerprint(write_csv(tmp_path / f"{name}.csv", data))
        for name, data in (("relabel", relabelled), ("extra", extra_row), ("drop", dropped), ("id", renamed))
    ]
    # The split is part of the data: other fractions or another seed move examples between splits.
    variants.append(_fingerprint(tmp_path / "a.csv", split={"train": 0.7, "val": 0.15, "test": 0.15}))
    variants.append(_fingerprint(tmp_path / "a.csv", split={"seed": 5}))
    assert len({base, *variants}) == 1 + len(variants)


def test_an_explicit_split_column_is_part_of_the_fingerprint(tmp_path):
    rows = [{**r, "part": ("train", "val", "test")[i % 3]} for i, r in enumerate(make_sentiment_rows(30))]
    base = _fingerprint(write_csv(tmp_path / "a.csv", rows), split_column="part")
    rows[0] = {**rows[0], "part": "test"}  # the same example, moved to another split
    moved = _fingerprint(write_csv(tmp_path / "b.csv", rows), split_column="part")
    assert base != moved


# The fingerprint of the bundled data set's first 200 rows as released: a value that changes means every
# cache and run made before no longer matches its data (reruns refuse), so it may change only on purpose.
BBC_NEWS_200 = "d1c5405bcfe19f79d52549f34eb9132a978850967eaf80b97df7b6642b2664c4"


@pytest.mark.slow  # the bundled data set
def test_bundled_dataset_fingerprint_is_stable():
    """Pinned, not compared within one process: the same across processes, machines and releases."""
    assert load_dataset(DatasetConfig(source="bundled:bbc_news", limit=200)).fingerprint == BBC_NEWS_200


IDENTITY = BackboneIdentity(
    name="some/model",
    revision=None,
    weights_sha256="w" * 64,
    config_sha256="c" * 64,
    tokenizer_sha256="t" * 64,
    local_dir="/models/some",
)
BACKBONE = BackboneConfig(name_or_path="some/model", layers=[0, 2], max_length=64)
EXTRACT = ExtractConfig()


def _key(fingerprint: str = "f" * 64, identity=IDENTITY, backbone=BACKBONE, extract=EXTRACT) -> str:
    return cache_key(cache_key_fields(fingerprint, identity, backbone, extract))


@pytest.mark.parametrize(
    "change",
    [
        {"fingerprint": "e" * 64},
        {"identity": replace(IDENTITY, weights_sha256="x" * 64)},
        {"identity": replace(IDENTITY, config_sha256="x" * 64)},
        {"identity": replace(IDENTITY, tokenizer_sha256="x" * 64)},
        {"identity": replace(IDENTITY, revision="v2")},
        {"backbone": BACKBONE.model_copy(update={"layers": [0, 1, 2]})},
        {"backbone": BACKBONE.model_copy(update={"layers": "all"})},
        {"backbone": BACKBONE.model_copy(update={"max_length": 128})},
        {"extract": EXTRACT.model_copy(update={"dtype": "int8"})},
        {"extract": EXTRACT.model_copy(update={"dtype": "bfloat16"})},
    ],
    ids=lambda change: next(iter(change)) + ":" + str(next(iter(change.values())))[:40],
)
def test_each_cache_key_input_changes_the_key(change):
    assert _key(**change) != _key()


def test_preprocessing_and_format_version_are_in_the_key():
    fields = cache_key_fields("f" * 64, IDENTITY, BACKBONE, EXTRACT)
    assert {"format_version", "preprocessing", "dtype", "max_length", "layers", "backbone"} <= set(fields)
    assert cache_key({**fields, "format_version": fields["format_version"] + 1}) != cache_key(fields)
    assert cache_key(
        {**fields, "preprocessing": {**fields["preprocessing"], "truncation": False}}
    ) != cache_key(fields)


def test_what_does_not_change_the_cache_bytes_keeps_the_key():
    same = [
        _key(identity=replace(IDENTITY, name="/elsewhere/model", local_dir="/elsewhere/model")),
        _key(backbone=BACKBONE.model_copy(update={"name_or_path": "/elsewhere/model", "batch_size": 7})),
        _key(extract=EXTRACT.model_copy(update={"workers": 3, "shard_size": 9, "codec": "zstd"})),
        _key(extract=EXTRACT.model_copy(update={"chunk_rows": 128, "chunks_per_file": 4})),
    ]
    assert set(same) == {_key()}


# One other value for every backbone and extract setting (a new setting must be added here), and the settings
# the cache must be extracted with first for that value to matter: a view seed needs views.
OTHER_VALUES = {
    "backbone": {
        "layers": [0, 1, 2],
        "max_length": 128,
        "batch_size": 7,
        "trust_remote_code": True,
        "allow_pickle": True,
    },
    "extract": {
        "workers": 3,
        "shard_size": 9,
        "dtype": "int8",
        "autocast": "bfloat16",
        "chunk_rows": 128,
        "codec": "zstd",
        "shuffle": "bit",
        "compression_level": 5,
        "blosc_blocksize": 0,
        "chunks_per_file": 4,
        "views": 2,
        "view_seed": 1,
    },
}
NEEDS = {"view_seed": {"views": 2}}
# Declared to affect the cache, but through the backbone's identity (its files' hashes), fixed in _key.
THROUGH_THE_IDENTITY = {"name_or_path", "revision"}


@pytest.mark.parametrize(
    ("section", "name"), [(section, name) for section, values in OTHER_VALUES.items() for name in values]
)
def test_a_setting_changes_the_cache_key_exactly_when_its_field_says_it_affects_the_cache(section, name):
    model, base = (BackboneConfig, BACKBONE) if section == "backbone" else (ExtractConfig, EXTRACT)
    base = base.model_copy(update=NEEDS.get(name, {}))
    other = base.model_copy(update={name: OTHER_VALUES[section][name]})
    changed = _key(**{section: other}) != _key(**{section: base})
    assert changed == (name in names_affecting(model, "cache")), f"{section}.{name}"


def test_every_backbone_and_extract_setting_is_tried_for_the_cache_key():
    assert set(OTHER_VALUES["backbone"]) | THROUGH_THE_IDENTITY == set(BackboneConfig.model_fields)
    assert set(OTHER_VALUES["extract"]) == set(ExtractConfig.model_fields)
    assert THROUGH_THE_IDENTITY <= set(names_affecting(BackboneConfig, "cache"))


def test_real_backbone_files_drive_the_identity(tmp_path, tiny_bert_dir):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bert_dir, copy)
    original = backbone_identity(BackboneConfig(name_or_path=str(tiny_bert_dir)))
    same = backbone_identity(BackboneConfig(name_or_path=str(copy)))
    assert same.key_fields() == original.key_fields()  # another path, same files: same backbone

    vocab = copy / "vocab.txt"
    vocab.write_text(vocab.read_text() + "extra-token\n")
    tokenizer_changed = backbone_identity(BackboneConfig(name_or_path=str(copy)))
    assert tokenizer_changed.tokenizer_sha256 != original.tokenizer_sha256

    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    weights_changed = backbone_identity(BackboneConfig(name_or_path=str(copy)))
    assert weights_changed.weights_sha256 != original.weights_sha256
    assert weights_changed.config_sha256 == original.config_sha256
