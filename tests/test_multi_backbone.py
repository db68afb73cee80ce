"""Several backbones over one dataset (an image and a text encoder on image-text pairs): each one is
extracted once into its own cache, and the data's image and text both count in its fingerprint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import write_config, write_image_text_csv
from unipt.pipeline import experiment
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cli.app import main
from unipt.pipeline.config import DatasetConfig, load_config
from unipt.pipeline.data.images import image_array
from unipt.pipeline.data.table import load_dataset
from unipt.pipeline.errors import UniptError


def pairs_config(tmp_path: Path, tiny_vit_dir: Path, tiny_bert_dir: Path) -> Path:
    csv_path = write_image_text_csv(tmp_path / "data")
    path = write_config(tmp_path / "pairs.yaml", str(csv_path), str(tiny_bert_dir), tmp_path)
    config = yaml.safe_load(path.read_text())
    config["dataset"].update(image_column="image", text_column="caption")
    text = config.pop("backbone")
    config["backbones"] = {"image": {"name_or_path": str(tiny_vit_dir), "batch_size": 8}, "text": text}
    config["train"].update(epochs=2)
    path.write_text(yaml.safe_dump(config))
    return path


def _dataset(csv_path: Path) -> DatasetConfig:
    return DatasetConfig(source=str(csv_path), image_column="image", text_column="caption", id_column="id")


def test_image_text_file_gives_pairs_and_both_count_in_the_fingerprint(tmp_path):
    csv_path = write_image_text_csv(tmp_path)
    ds = load_dataset(_dataset(csv_path))
    assert ds.input_kind == "image+text" and ds.input_columns == ["image", "text"]
    row = ds.table.filter(ds.table.column("example_id").to_numpy(zero_copy_only=False) == "p000").to_pylist()[
        0
    ]
    assert np.array_equal(image_array(row["image"]), np.asarray(Image.open(tmp_path / "images/000.png")))
    assert row["text"].startswith("a ") and "square" in row["text"]

    # One changed pixel, or one changed caption, is another version of the data.
    pixels = np.asarray(Image.open(tmp_path / "images/005.png")).copy()
    pixels[0, 0] = (0, 0, 0)
    Image.fromarray(pixels).save(tmp_path / "images/005.png")
    after_pixel = load_dataset(_dataset(csv_path))
    assert after_pixel.fingerprint != ds.fingerprint
    text = csv_path.read_text().replace("square", "box", 1)
    csv_path.write_text(text)
    assert load_dataset(_dataset(csv_path)).fingerprint not in {ds.fingerprint, after_pixel.fingerprint}


def test_missing_or_broken_image_files_are_one_clear_error(tmp_path):
    csv_path = write_image_text_csv(tmp_path, n=8)
    (tmp_path / "images/003.png").unlink()
    with pytest.raises(UniptError, match=r"row 3: image file .*003.png not found"):
        load_dataset(_dataset(csv_path))
    (tmp_path / "images/003.png").write_bytes(b"not a png")
    with pytest.raises(UniptError, match="row 3: cannot decode the image"):
        load_dataset(_dataset(csv_path))


def test_config_takes_backbone_or_backbones_not_both(tmp_path, tiny_bert_dir, sentiment_csv):
    path = write_config(tmp_path / "c.yaml", str(sentiment_csv), str(tiny_bert_dir), tmp_path)
    config = yaml.safe_load(path.read_text())
    config["backbones"] = {"text": config["backbone"]}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UniptError, match="exactly one of `backbone`"):
        load_config(path)
    config.pop("backbone")
    config["backbones"] = {"../evil": config["backbones"]["text"]}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UniptError, match="must be letters, digits"):
        load_config(path)


@pytest.mark.e2e
def test_each_backbone_is_extracted_once_into_its_own_cache(
    tmp_path, tiny_vit_dir, tiny_bert_dir, ray_session, capsys
):
    path = pairs_config(tmp_path, tiny_vit_dir, tiny_bert_dir)
    assert main(["extract", str(path), "--no-progress"]) == 0
    captured = capsys.readouterr()
    paths = captured.out.split()
    assert len(paths) == 2 and captured.err.count("cache miss") == 2

    prep = experiment.prepare(load_config(path))
    image, text = prep.backbones["image"], prep.backbones["text"]
    assert image.key != text.key and prep.primary is image
    assert paths == [str(prep.cache_root.location(image.key)), str(prep.cache_root.location(text.key))]
    image_cache = open_cache(prep.cache_root.location(image.key))
    text_cache = open_cache(prep.cache_root.location(text.key))
    assert image_cache.attrs["backbone"]["model_type"] == "vit"
    assert text_cache.attrs["backbone"]["model_type"] == "bert"
    # Both caches hold the same examples in the same order, so a retrieval pair is one row index.
    assert image_cache.examples.column("example_id") == text_cache.examples.column("example_id")
    assert image_cache.read_example(0, 0).shape == (17, 32)  # 16 patches + CLS

    # Running again trains on the primary cache and extracts nothing.
    assert main(["run", str(path), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("cache hit") == 2 and "cache miss" not in captured.err
    (record_file,) = (tmp_path / "runs").glob("*/record.json")
    record = json.loads(record_file.read_text())
    assert record["cache"]["hit"] is True and record["cache"]["key"] == image.key
    assert {name: b["cache_key"] for name, b in record["backbones"].items()} == {
        "image": image.key,
        "text": text.key,
    }


@pytest.mark.e2e
def test_image_text_retrieval_end_to_end(tmp_path, tiny_vit_dir, tiny_bert_dir, ray_session, capsys):
    """`unipt run` with task retrieval: both caches extracted, UniPT per side trained contrastively."""
    path = pairs_config(tmp_path, tiny_vit_dir, tiny_bert_dir)
    config = yaml.safe_load(path.read_text())
    config["train"].update(task="retrieval", epochs=3, batch_size=8, probe_baseline=False)
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("cache miss") == 2 and "test rsum" in captured.out
    (record_file,) = (tmp_path / "runs").glob("*/record.json")
    record = json.loads(record_file.read_text())
    metrics = record["metrics"]
    for direction in ("q2g", "g2q"):
        recalls = [metrics[f"test_{direction}_r{k}"] for k in (1, 5, 10)]
        assert recalls == sorted(recalls) and all(0.0 <= r <= 100.0 for r in recalls)
    assert math.isclose(
        metrics["test_rsum"],
        sum(metrics[f"test_{d}_r{k}"] for d in ("q2g", "g2q") for k in (1, 5, 10)),
        rel_tol=1e-9,
    )
    assert len(record["layer_weights"]) == 2  # the image side's: embeddings and layer 1
    assert len(record["gallery_layer_weights"]) == 2  # the text side's
    assert (record_file.parent / "curves.png").is_file()

    # Training again from the caches alone: the same numbers, no extraction.
    assert main(["train", str(path), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("cache hit") == 2
    again = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/record.json")]
    assert sorted(r["metrics"]["test_rsum"] for r in again) == [metrics["test_rsum"]] * 2


def test_retrieval_needs_two_backbones(tmp_path, tiny_bert_dir, sentiment_csv):
    path = write_config(
        tmp_path / "c.yaml", str(sentiment_csv), str(tiny_bert_dir), tmp_path, train={"task": "retrieval"}
    )
    with pytest.raises(UniptError, match="retrieval needs two backbones"):
        load_config(path)
