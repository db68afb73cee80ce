"""Text-pair datasets (``dataset.text_pair_column``): loading, identity, and the encoding against the
tokenizer's own pair encoding; and the bundled pair task ``bundled:rt_same_movie``."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import make_sentiment_rows, write_config, write_csv
from unipt.extract.backbones import HFTextBackbone
from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline import experiment
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cli.app import main
from unipt.pipeline.config import DatasetConfig, load_config
from unipt.pipeline.data.images import make_image
from unipt.pipeline.data.raw_examples import RawExamples
from unipt.pipeline.data.table import DatasetTable, backbone_inputs, input_hashes, load_dataset, normalize
from unipt.pipeline.errors import UniptError
from unipt.pipeline.model.files import read_model_spec
from unipt.pipeline.model.predict import load_model

# The fingerprints make_sentiment_rows(40) had before text pairs existed (with id_column "id", and
# with content-derived ids): a single-text dataset must keep them, and so its cache keys.
SINGLE_TEXT_FINGERPRINTS = {
    "id": "80e3d8179ff0f6a1d77d35d35702b35974d2d601cb6b47aae5db4546dcd24cec",
    None: "890e609ec7053221f85f22a3217e3372eadbf5bab37b99e9d09a4b8548a0a060",
}


def pair_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Sentiment rows with a second text each; the label says whether both texts agree."""
    rng = random.Random(seed)
    rows = make_sentiment_rows(n, seed)
    seconds = make_sentiment_rows(n, seed + 1)
    rng.shuffle(seconds)
    return [
        {**row, "second": other["text"], "label": "agree" if row["label"] == other["label"] else "differ"}
        for row, other in zip(rows, seconds, strict=True)
    ]


def hashes_by_id(ds: DatasetTable) -> dict[str, str]:
    return dict(zip(ds.table.column("example_id").to_pylist(), input_hashes(ds.table), strict=True))


def pair_config(path: Path, **settings: object) -> DatasetConfig:
    return DatasetConfig(**{"source": str(path), "id_column": "id", "text_pair_column": "second", **settings})


def test_single_text_datasets_keep_their_fingerprint_and_input_hashes(tmp_path):
    path = write_csv(tmp_path / "single.csv", make_sentiment_rows(40))
    for id_column, fingerprint in SINGLE_TEXT_FINGERPRINTS.items():
        ds = load_dataset(DatasetConfig(source=str(path), id_column=id_column))
        assert ds.fingerprint == fingerprint
        assert "text_pair" not in ds.table.column_names and ds.input_columns == ["text"]
    texts = ds.table.column("text").to_pylist()
    assert input_hashes(ds.table) == [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    assert backbone_inputs(ds.table, "text") == texts


def test_pair_column_is_in_the_table_fingerprint_and_input_hash(tmp_path):
    rows = pair_rows(40)
    path = write_csv(tmp_path / "pairs.csv", rows)
    single = load_dataset(DatasetConfig(source=str(path), id_column="id"))
    pairs = load_dataset(pair_config(path))
    assert pairs.table.column_names == ["example_id", "text", "text_pair", "label", "split"]
    assert pairs.input_kind == "text" and pairs.input_columns == ["text", "text_pair"]
    by_id = {row["id"]: row for row in rows}
    for record in pairs.table.to_pylist():
        assert record["text_pair"] == by_id[record["example_id"]]["second"]
    assert pairs.fingerprint != single.fingerprint

    # (a, b) differs from a alone and from (b, a) (the split is content-grouped, so compare by id).
    swapped = load_dataset(
        DatasetConfig(source=str(path), id_column="id", text_column="second", text_pair_column="text")
    )
    assert swapped.fingerprint not in (pairs.fingerprint, single.fingerprint)
    a, ab, ba = (hashes_by_id(ds) for ds in (single, pairs, swapped))
    assert all(len({a[i], ab[i], ba[i]}) == 3 for i in by_id)
    # Neither text may be taken for the other's end: the pair is not its joined characters.
    first, second = pairs.table.column("text")[0].as_py(), pairs.table.column("text_pair")[0].as_py()
    words = second.split()
    moved = {"id": "moved", "text": f"{first} {words[0]}", "second": " ".join(words[1:]), "label": "agree"}
    moved_table = load_dataset(pair_config(write_csv(tmp_path / "moved.csv", [*rows, moved]))).table
    assert len(set(input_hashes(moved_table))) == len(rows) + 1

    # One change in one second text changes the fingerprint and that example's input hash only.
    changed = [dict(row) for row in rows]
    changed[3]["second"] += " again"
    edited = load_dataset(pair_config(write_csv(tmp_path / "edited.csv", changed)))
    assert edited.fingerprint != pairs.fingerprint
    assert [i for i, h in hashes_by_id(edited).items() if h != ab[i]] == ["r0003"]


def test_pairs_from_jsonl_and_parquet_are_the_same_dataset(tmp_path):
    rows = pair_rows(30)
    csv_path = write_csv(tmp_path / "pairs.csv", rows)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in reversed(rows)))
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    fingerprints = {load_dataset(pair_config(p)).fingerprint for p in (csv_path, jsonl, parquet)}
    assert len(fingerprints) == 1


def test_identical_pairs_share_a_split_but_swapped_ones_need_not(tmp_path):
    rows = pair_rows(200)
    # Copies of one pair (up to whitespace) with distinct ids: the content-grouped split keeps them together.
    copies = [
        {
            "id": f"copy{i}",
            "text": rows[0]["text"] + " " * i,
            "second": rows[0]["second"].replace(" ", "\n  "),
            "label": rows[0]["label"],
        }
        for i in range(8)
    ]
    ds = load_dataset(pair_config(write_csv(tmp_path / "dup.csv", rows + copies)))
    split_of = dict(
        zip(ds.table.column("example_id").to_pylist(), ds.table.column("split").to_pylist(), strict=True)
    )
    assert len({split_of[row["id"]] for row in [rows[0], *copies]}) == 1
    assert ds.duplicates["val_in_train"] == ds.duplicates["test_in_train"] == 0


def test_bad_pair_settings_are_one_clear_error(tmp_path):
    rows = pair_rows(20)
    rows[7]["second"] = " "
    path = write_csv(tmp_path / "pairs.csv", rows)
    image = make_image(np.zeros((2, 2, 1), np.uint8))
    cases = [
        (lambda: load_dataset(pair_config(path, text_pair_column="nope")), "column 'nope' not found"),
        (lambda: load_dataset(pair_config(path)), "row 7: text_pair is empty"),
        (
            lambda: normalize(
                RawExamples(None, ["a", "b"], images=[image] * 2, text_pairs=["x", "y"]), pair_config(path)
            ),
            "needs dataset.text_column and no dataset.image_column",
        ),
        (
            lambda: normalize(
                RawExamples(["p", "q"], ["a", "b"], images=[image] * 2, text_pairs=["x", "y"]),
                pair_config(path),
            ),
            "needs dataset.text_column and no dataset.image_column",
        ),
    ]
    for load, message in cases:
        with pytest.raises(UniptError, match=message) as caught:
            load()
        assert "\n" not in str(caught.value)


def test_pair_table_with_a_non_text_backbone_is_refused(tmp_path):
    ds = load_dataset(pair_config(write_csv(tmp_path / "pairs.csv", pair_rows(20))))
    with pytest.raises(UniptError, match="holds text pairs .* reads images"):
        backbone_inputs(ds.table, "image")


# --- the encoding, against the tokenizer's own pair encoding --------------------------------------------


PAIRS = [
    ("the film was great", "a very dull and tedious plot"),
    ("superb", "superb"),
    ("a very dull and tedious plot", "the film was great"),
    ("the actors is quite weak and awful and the story is boring and the plot is clumsy", "moving"),
]


def test_backbone_encodes_pairs_as_the_tokenizer_does(tiny_bert_dir):
    backbone = HFTextBackbone(BackboneLoadSpec(str(tiny_bert_dir), device="cpu"))
    tokenizer, model = backbone.tokenizer, backbone.model
    firsts, seconds = [a for a, _ in PAIRS], [b for _, b in PAIRS]
    reference = tokenizer(firsts, seconds, truncation=True, max_length=32)
    given = backbone._tokenize(PAIRS, 32)  # exactly what the forward pass is fed
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert given[key] == reference[key]
    assert {1} <= set(given["token_type_ids"][0]) and given["token_type_ids"][0][0] == 0  # two segments

    encoded = backbone.encode(PAIRS, [0, 1, 2], max_length=32, batch_size=3, dtype="float32")
    assert encoded.lengths == [len(ids) for ids in reference["input_ids"]]
    offsets = np.cumsum([0, *encoded.lengths])
    for i, (a, b) in enumerate(PAIRS):
        tokens = tokenizer(a, b, return_tensors="pt")
        with torch.no_grad():
            states = model(**tokens, output_hidden_states=True).hidden_states
            unsegmented = model(input_ids=tokens["input_ids"], output_hidden_states=True).hidden_states
        for layer in (0, 1, 2):
            got = encoded.layers[layer][offsets[i] : offsets[i + 1]]
            np.testing.assert_allclose(got, states[layer][0].numpy(), rtol=1e-5, atol=1e-5)
        # The segment ids reach the model: without them the second text's states differ.
        assert not np.allclose(encoded.layers[0][offsets[i] : offsets[i + 1]], unsegmented[0][0].numpy())

    # Truncation of pairs is the tokenizer's longest_first: the longer text is cut first.
    short = backbone.encode(PAIRS, [2], max_length=10, batch_size=2)
    cut = tokenizer(firsts, seconds, truncation=True, max_length=10)
    assert short.lengths == [len(ids) for ids in cut["input_ids"]] and max(short.lengths) == 10
    assert short.truncated == sum(len(ids) > 10 for ids in reference["input_ids"]) > 0
    assert tokenizer.decode(cut["input_ids"][3]).endswith("[SEP] moving [SEP]")


def test_online_baselines_tokenize_pairs_as_extraction_does(tmp_path, tiny_bert_dir):
    from benchmarks.online_baselines import load_online_data
    from unipt.pipeline.config import BackboneConfig, TrainConfig

    ds = load_dataset(pair_config(write_csv(tmp_path / "pairs.csv", pair_rows(24))))
    backbone = BackboneConfig(name_or_path=str(tiny_bert_dir), max_length=16)
    data = load_online_data(ds.table, ds.label_names, backbone, TrainConfig(device="cpu"))
    firsts, seconds = ds.table.column("text").to_pylist(), ds.table.column("text_pair").to_pylist()
    reference = data.backbone.tokenizer(firsts, seconds, truncation=True, max_length=16)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert data.encoded[key] == reference[key]


@pytest.mark.slow
def test_cached_pair_activations_are_the_backbone_on_the_pair_encoding(ray_session, tmp_path, tiny_bert_dir):
    path = write_csv(tmp_path / "pairs.csv", pair_rows(96))
    config_path = write_config(
        tmp_path / "pairs.yaml",
        str(path),
        str(tiny_bert_dir),
        tmp_path,
        dataset={"text_pair_column": "second"},
        extract={"shard_size": 32},
    )
    prep = experiment.prepare(load_config(config_path))
    result = experiment.extract(prep, progress=False)
    reader = open_cache(result.path)
    pairs = list(zip(*(prep.dataset.table.column(c).to_pylist() for c in ("text", "text_pair")), strict=True))
    backbone = HFTextBackbone(BackboneLoadSpec(str(tiny_bert_dir), device="cpu"))
    tokenizer = backbone.tokenizer
    lengths = [
        len(ids)
        for ids in tokenizer(*map(list, zip(*pairs, strict=True)), truncation=True, max_length=32)[
            "input_ids"
        ]
    ]
    assert reader.examples.column("length").to_pylist() == lengths
    for i in (0, 41, 95):
        tokens = tokenizer(*pairs[i], truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad():
            states = backbone.model(**tokens, output_hidden_states=True).hidden_states
        for layer in reader.layers:
            np.testing.assert_allclose(
                reader.read_example(i, layer), states[layer][0].numpy(), atol=2e-2, rtol=1e-2
            )

    # The same file read as single texts is another dataset version, and shares no input with the pairs.
    single = experiment.prepare(load_config(config_path, ["dataset.text_pair_column=null"]))
    assert single.key != prep.key and single.dataset.fingerprint != prep.dataset.fingerprint
    assert not set(input_hashes(single.dataset.table)) & set(input_hashes(prep.dataset.table))


# --- bundled:rt_same_movie -------------------------------------------------------------------------------


def _movies_of_snippets() -> dict[str, set[str]]:
    import pyarrow.csv as pa_csv

    from unipt.pipeline.data.bundled import bundled_data_path

    movies: dict[str, set[str]] = {}
    for row in pa_csv.read_csv(bundled_data_path("bundled:rotten_tomatoes")).to_pylist():
        if row["category"] != "plot":
            movies.setdefault(" ".join(row["text"].split()), set()).add(row["movie_name"])
    return movies


@pytest.mark.slow  # the bundled data set
def test_rt_same_movie_is_balanced_split_by_movie_and_deterministic():
    ds = load_dataset(DatasetConfig(source="bundled:rt_same_movie"))
    assert ds.label_names == ["different", "same"] and 5_500 < len(ds) < 6_500
    assert ds.table.column_names == ["example_id", "text", "text_pair", "label", "split"]
    counts = ds.class_counts()
    assert all(c["same"] == c["different"] > 0 for c in counts.values())  # balanced in every split
    assert ds.split_counts()["train"] > 6 * ds.split_counts()["test"]

    movies_of = _movies_of_snippets()
    split_of_movie: dict[str, set[str]] = {}
    seen = set()
    for record in ds.table.to_pylist():
        (a,), (b,) = (
            movies_of[" ".join(record["text"].split())],
            movies_of[" ".join(record["text_pair"].split())],
        )
        assert (a == b) == (ds.label_names[record["label"]] == "same")
        assert record["text"] != record["text_pair"]
        for movie in (a, b):
            split_of_movie.setdefault(movie, set()).add(record["split"])
        seen.add(frozenset((record["text"], record["text_pair"])))
    assert len(seen) == len(ds)  # no pair twice, in either order
    assert len(split_of_movie) > 400 and all(len(s) == 1 for s in split_of_movie.values())

    again = load_dataset(DatasetConfig(source="bundled:rt_same_movie"))
    assert again.fingerprint == ds.fingerprint and again.table.equals(ds.table)
    reseeded = load_dataset(DatasetConfig(source="bundled:rt_same_movie", split={"seed": 1}))
    assert reseeded.fingerprint != ds.fingerprint
    assert all(c["same"] == c["different"] for c in reseeded.class_counts().values())


@pytest.mark.e2e
def test_a_pair_model_is_recorded_and_predicts_pairs_as_its_cache_saw_them(
    ray_session, tmp_path, tiny_bert_dir, capsys
):
    path = write_csv(tmp_path / "pairs.csv", pair_rows(120))
    config_path = write_config(
        tmp_path / "pairs.yaml", str(path), str(tiny_bert_dir), tmp_path,
        dataset={"text_pair_column": "second"}, train={"epochs": 2},
    )  # fmt: skip
    prep = experiment.prepare(load_config(config_path))
    run = experiment.run(prep, progress=False)  # extract, train, probe, record, registry
    assert {"test_acc", "probe_test_acc", "majority_test_acc"} <= set(run.trained.metrics)
    spec = read_model_spec(run.run_dir)
    assert spec.input == "text_pair"

    model = load_model(run.run_dir, device="cpu")
    indices, from_cache = model.outputs_from_cache(open_cache(prep.cache_root.location(prep.key)), "test")
    table = prep.dataset.table
    rows = [
        {"id": table.column("example_id")[int(i)].as_py(), "a": table.column("text")[int(i)].as_py(),
         "b": table.column("text_pair")[int(i)].as_py()}
        for i in indices
    ]  # fmt: skip
    predictions = model.predict([(r["a"], r["b"]) for r in rows], batch_size=16)
    np.testing.assert_allclose(predictions.outputs, from_cache, atol=2e-3, rtol=1e-3)

    inputs = write_csv(tmp_path / "inputs.csv", rows)
    out = tmp_path / "preds.csv"
    argv = ["--input", str(inputs), "--text-column", "a", "--text-pair-column", "b", "--id-column", "id"]
    assert main(["predict", str(run.run_dir), *argv, "--out", str(out), "--no-progress"]) == 0
    assert out.read_text().count("\n") == len(rows) + 1
    # A pair model given single texts (or no second column) is one line of error, not a wrong number.
    for bad in (["--text", "a wonderful film"], ["--input", str(inputs), "--text-column", "a"]):
        capsys.readouterr()
        assert main(["predict", str(run.run_dir), *bad, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("unipt: error:") and err.count("\n") == 1, err
