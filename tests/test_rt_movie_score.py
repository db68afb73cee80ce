"""``bundled:rt_movie_score``: Rotten Tomatoes snippets labelled with their movie's share of fresh reviews."""

from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow.csv as pa_csv
import pytest

from unipt.pipeline.config import DatasetConfig
from unipt.pipeline.data.bundled import bundled_data_path
from unipt.pipeline.data.bundled_sets import RT_SCORE_MIN_REVIEWS
from unipt.pipeline.data.table import load_dataset
from unipt.pipeline.errors import UniptError

SOURCE = "bundled:rt_movie_score"


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    """The critic snippets of the raw corpus (the "plot" rows are summaries, not reviews)."""
    rows = pa_csv.read_csv(bundled_data_path("bundled:rotten_tomatoes")).to_pylist()
    return [row for row in rows if row["category"] != "plot"]


@pytest.fixture(scope="module")
def dataset():
    return load_dataset(DatasetConfig(source=SOURCE), task="regression")


@pytest.mark.slow  # the bundled data set
def test_targets_are_each_movies_share_of_fresh_reviews(dataset, corpus):
    reviews, fresh = Counter(r["movie_name"] for r in corpus), Counter()
    fresh.update(r["movie_name"] for r in corpus if r["category"] == "fresh")
    kept = {movie for movie, n in reviews.items() if n >= RT_SCORE_MIN_REVIEWS}
    assert len(dataset) == sum(reviews[m] for m in kept)  # every snippet of a kept movie, no other
    assert dataset.label_names == [] and str(dataset.table.schema.field("label").type) == "double"
    labels = dataset.table.column("label").to_pylist()
    assert all(0.0 <= y <= 1.0 for y in labels) and min(labels) == 0.0 and max(labels) == 1.0
    # Each snippet quoted for exactly one kept movie carries that movie's tomatometer and its split.
    movies_of = defaultdict(set)
    for row in corpus:
        if row["movie_name"] in kept:
            movies_of[" ".join(row["text"].split())].add(row["movie_name"])
    targets, splits = defaultdict(set), defaultdict(set)
    rows = zip(*(dataset.table.column(c).to_pylist() for c in ("text", "label", "split")), strict=True)
    for text, label, split in rows:
        movies = movies_of[" ".join(text.split())]
        assert movies, f"snippet not from a kept movie: {text[:60]!r}"
        if len(movies) == 1:  # a few snippets are quoted for several movies
            (movie,) = movies
            targets[movie].add(label)
            splits[movie].add(split)
    assert len(targets) > 400  # 2 of the 405 movies have only snippets quoted for other movies too
    for movie, values in targets.items():
        assert values == {fresh[movie] / reviews[movie]}, movie  # one target per movie: its own share
        assert len(splits[movie]) == 1, movie  # one split per movie: test movies are never trained on
    assert all(n > 0 for n in dataset.split_counts().values())


@pytest.mark.slow  # the bundled data set
def test_deterministic(dataset):
    again = load_dataset(DatasetConfig(source=SOURCE), task="regression")
    assert again.fingerprint == dataset.fingerprint and again.table.equals(dataset.table)


def test_refused_as_classification():
    with pytest.raises(UniptError, match="set train.task: regression"):
        load_dataset(DatasetConfig(source=SOURCE), task="classification")
