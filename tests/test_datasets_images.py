"""The bundled MNIST-5k image dataset: the image column, content ids, seeded split, fingerprint."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow.csv as pa_csv
import pytest

from unipt.pipeline.config import DatasetConfig, SplitConfig
from unipt.pipeline.data.bundled import bundled_data_path
from unipt.pipeline.data.bundled_sets import _mnist_5k
from unipt.pipeline.data.images import IMAGE_TYPE, image_array, make_image
from unipt.pipeline.data.table import load_dataset, normalize
from unipt.pipeline.errors import UniptError

MNIST = DatasetConfig(source="bundled:mnist_5k")


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(MNIST)


@pytest.mark.slow  # the bundled data set
def test_mnist_5k_is_an_image_table(mnist):
    assert mnist.input_kind == "image" and mnist.input_columns == ["image"]
    assert mnist.table.column_names == ["example_id", "image", "label", "split"]
    assert mnist.table.schema.field("image").type == IMAGE_TYPE
    assert len(mnist) == 5000 and mnist.label_names == [str(d) for d in range(10)]
    assert Counter(mnist.table.column("label").to_pylist()) == {d: 500 for d in range(10)}
    counts = mnist.split_counts()
    assert sum(counts.values()) == 5000 and 3800 < counts["train"] < 4200 and counts["val"] > 400
    first = mnist.table.column("image")[0].as_py()
    assert (first["height"], first["width"], first["channels"]) == (28, 28, 1)
    assert image_array(first).shape == (28, 28, 1)


@pytest.mark.slow  # the bundled data set
def test_images_and_labels_are_the_csv_rows(mnist):
    raw = pa_csv.read_csv(
        bundled_data_path("bundled:mnist_5k"), read_options=pa_csv.ReadOptions(autogenerate_column_names=True)
    )
    matrix = np.stack([raw.column(i).to_numpy() for i in range(raw.num_columns)], axis=1)
    expected = Counter((bytes(row[:784].astype(np.uint8)), int(row[784])) for row in matrix)
    table = mnist.table
    got = Counter(
        (image["pixels"], label)
        for image, label in zip(
            table.column("image").to_pylist(), table.column("label").to_pylist(), strict=True
        )
    )
    assert got == expected


def test_text_datasets_say_text(sentiment_csv):
    ds = load_dataset(DatasetConfig(source=str(sentiment_csv), id_column="id"))
    assert ds.input_kind == "text" and ds.input_columns == ["text"]


@pytest.mark.slow  # the bundled data set
def test_ids_and_fingerprint_come_from_the_pixels(mnist):
    raw = _mnist_5k(bundled_data_path("bundled:mnist_5k"))
    assert load_dataset(MNIST).fingerprint == mnist.fingerprint  # same data, same fingerprint
    reordered = normalize(replace(raw, images=raw.images[::-1], labels=raw.labels[::-1]), MNIST)
    assert reordered.fingerprint == mnist.fingerprint and reordered.table.equals(mnist.table)

    edited_images = list(raw.images)
    pixels = bytearray(edited_images[123]["pixels"])
    pixels[400] ^= 1  # one pixel, one grey level
    edited_images[123] = {**edited_images[123], "pixels": bytes(pixels)}
    edited = normalize(replace(raw, images=edited_images), MNIST)
    assert edited.fingerprint != mnist.fingerprint
    changed = set(edited.table.column("example_id").to_pylist()) ^ set(
        mnist.table.column("example_id").to_pylist()
    )
    assert len(changed) == 2  # only that image's content-derived id changed

    resplit = load_dataset(MNIST.model_copy(update={"split": SplitConfig(seed=1)}))
    assert resplit.fingerprint != mnist.fingerprint


@pytest.mark.slow  # the bundled data set
def test_limit_is_a_seeded_sample_of_images(mnist):
    one = load_dataset(MNIST.model_copy(update={"limit": 50}))
    two = load_dataset(MNIST.model_copy(update={"limit": 50}))
    assert len(one) == 50 and one.fingerprint == two.fingerprint and one.input_kind == "image"
    assert set(one.table.column("example_id").to_pylist()) <= set(
        mnist.table.column("example_id").to_pylist()
    )


@pytest.mark.slow  # the bundled data set
def test_bad_images_are_one_line_errors():
    raw = _mnist_5k(bundled_data_path("bundled:mnist_5k"))
    broken = list(raw.images)
    broken[7] = {**broken[7], "pixels": broken[7]["pixels"][:-1]}
    with pytest.raises(UniptError, match=r"row 7: image pixels do not match its shape \[28, 28, 1\]"):
        normalize(replace(raw, images=broken), MNIST)
    with pytest.raises(UniptError, match="must be uint8"):
        make_image(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(UniptError, match=r"\[H, W\] or \[H, W, 1\|3\]"):
        make_image(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(UniptError, match="takes images, but got text"):
        image_array("a sentence")
    with pytest.raises(UniptError, match="unknown bundled dataset 'bundled:cifar'"):
        load_dataset(DatasetConfig(source="bundled:cifar"))


def test_image_round_trip():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    value = make_image(rgb)
    assert (value["height"], value["width"], value["channels"]) == (2, 3, 3)
    np.testing.assert_array_equal(image_array(value), rgb)
    np.testing.assert_array_equal(image_array(rgb[:, :, 0]), rgb[:, :, :1])
