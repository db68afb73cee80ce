"""Shared fixtures: a tiny random BERT saved like a hub model, a small labelled CSV, a Ray session, and one
extraction of the tiny BERT that every test which only reads a cache shares."""

from __future__ import annotations

import csv
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from unipt.pipeline.cache.layout import LayerSpec, StoreLayout
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cache.writer import CacheBuilder, write_shard
from unipt.pipeline.data.bundled import bundled_model_path

POSITIVE = ["great", "wonderful", "superb", "moving", "brilliant", "charming", "funny"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "weak", "clumsy", "tedious"]
FILLER = ["the", "film", "movie", "plot", "actors", "story", "was", "is", "a", "and", "very", "quite"]


def save_tiny_bert(path: Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """A 2-layer BERT of this width with random weights and the real MiniLM tokenizer files, saved to path."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).eval().save_pretrained(path, safe_serialization=True)
    source = bundled_model_path("bundled:all-minilm-l6-v2")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, path / name)
    return path


def strict_json(text: str) -> object:
    """``json.loads`` that refuses NaN and Infinity, which Python writes but JSON does not have."""

    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(autouse=True)
def _run_records_are_strict_json(request: pytest.FixtureRequest):
    """After every test that used tmp_path: each run record it left there parses as strict JSON."""
    folder = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    for record in folder.rglob("record.json") if folder is not None else []:
        strict_json(record.read_text())


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, width-32 BERT with random weights and the real MiniLM tokenizer files."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, width-32 ViT on 32x32 images (16 patches + CLS) with random weights and its processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-vit")
    ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
    ).eval().save_pretrained(path, safe_serialization=True)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def make_sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.choices(FILLER, k=rng.randint(4, 14)) + rng.choices(
            POSITIVE if label == "pos" else NEGATIVE, k=rng.randint(1, 3)
        )
        rng.shuffle(words)
        rows.append({"id": f"r{i:04d}", "text": " ".join(words), "label": label})
    return rows


def make_score_rows(n: int, column: str = "score") -> list[dict]:
    """Regression rows: a review's score is (#positive - #negative sentiment words) plus noise, learnable
    from the text, in ``column``."""
    rng = random.Random(5)
    rows = []
    for row in make_sentiment_rows(n, seed=3):
        words = row["text"].split()
        score = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
        rows.append({"id": row["id"], "text": row["text"], column: round(score + rng.gauss(0, 0.3), 3)})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def sentiment_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "sentiment.csv", make_sentiment_rows(240))


def write_config(path: Path, dataset_source: str, backbone_path: str, root: Path, **sections: dict) -> Path:
    config = {
        "name": "test",
        "seed": 0,
        "dataset": {
            "source": dataset_source,
            "id_column": "id",
            "split": {"train": 0.6, "val": 0.2, "test": 0.2},
        },
        "backbone": {"name_or_path": backbone_path, "max_length": 32, "batch_size": 16},
        "extract": {"shard_size": 64, "chunk_rows": 256},
        "train": {"epochs": 12, "batch_size": 16, "lr": 1.0e-2, "block_examples": 32, "probe_baseline": True},
        "storage": {
            "cache_root": str(root / "cache"),
            "runs_root": str(root / "runs"),
            "registry": str(root / "registry.sqlite"),
        },
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path) -> Path:
    return write_config(tmp_path / "tiny.yaml", str(sentiment_csv), str(tiny_bert_dir), tmp_path)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every in-process extraction test (starting Ray takes seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``unipt`` in a fresh interpreter, as a user would."""
    result = subprocess.run(
        [sys.executable, "-m", "unipt.pipeline.cli", *args], capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"unipt {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


KEY = "ab" * 16


def extract_tiny(root: Path, tiny_bert_dir: Path) -> tuple[Path, Path, str]:
    """`unipt extract` of 60 sentiment rows with the tiny BERT under root: (config, data file, cache key)."""
    from unipt.pipeline.cli.app import main

    data = write_csv(root / "data.csv", make_sentiment_rows(60))
    config = write_config(root / "config.yaml", str(data), str(tiny_bert_dir), root, train={"epochs": 1})
    assert main(["extract", str(config), "--no-progress"]) == 0
    (key,) = CacheRoot(root / "cache").keys()
    return config, data, key


@dataclass(frozen=True)
class Extraction:
    """A committed `unipt extract` of :func:`extract_tiny`: the folder holding it, its config and data file
    (both in ``root``), its cache key and the backbone it ran. The config's cache root is ``root/cache``."""

    root: Path
    config: Path
    data: Path
    key: str
    backbone: Path

    @property
    def cache_root(self) -> Path:
        return self.root / "cache"

    @property
    def view(self) -> Path:
        """The view's store: what ``--cache`` and :func:`open_cache` take."""
        return self.cache_root / self.key

    @property
    def segment(self) -> Path:
        """The one segment of the view's activation space: the Zarr store that holds the chunks."""
        (segment,) = (self.cache_root / "spaces").glob("*/segments/*")
        return segment

    def config_in(self, where: Path, **sections: dict) -> Path:
        """A config of the same data, backbone and extract settings, so it reads this cache, that keeps its
        runs and registry under ``where``; ``sections`` change other settings as in :func:`write_config`."""
        storage = {**sections.pop("storage", {}), "cache_root": str(self.cache_root)}
        path = where / "shared-extraction.yaml"
        return write_config(path, str(self.data), str(self.backbone), where, storage=storage, **sections)

    def copy_cache(self, where: Path) -> Path:
        """The cache root (views and spaces, not its leases) copied to ``where/cache``, for a test that
        changes a cache: gc, damage, relabelling, re-extraction. A local copy takes milliseconds."""
        copy = where / "cache"
        shutil.copytree(self.cache_root, copy, ignore=shutil.ignore_patterns(".partial", ".leases"))
        return copy


def _files_of(root: Path) -> dict[str, tuple[int, int]]:
    """Each file under root (less the read leases a reader takes and gives back): its size and mtime."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file() and ".leases" not in path.relative_to(root).parts
    }


@pytest.fixture(scope="session")
def _extracted_once(ray_session, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Extraction:
    root = tmp_path_factory.mktemp("shared-extraction")
    return Extraction(root, *extract_tiny(root, tiny_bert_dir), backbone=tiny_bert_dir)


@pytest.fixture
def shared_extraction(_extracted_once: Extraction, request: pytest.FixtureRequest) -> Iterator[Extraction]:
    """The session's one real extraction (Ray, the tiny BERT, 60 rows, layers 0-2), for tests that only read
    its cache: info, ls, verify, export, train or predict from it. Runs trained from it must go to the
    test's own ``--runs-root`` and ``--registry``; a test that changes a cache copies it first
    (:meth:`Extraction.copy_cache`). After each test, any file added, removed or rewritten under its folder
    fails that test, so one test cannot change what the next one reads."""
    before = _files_of(_extracted_once.root)
    yield _extracted_once
    after = _files_of(_extracted_once.root)
    rewritten = {name for name in before.keys() & after.keys() if before[name] != after[name]}
    changed = sorted(set(before) ^ set(after) | rewritten)
    assert not changed, f"{request.node.nodeid} changed the shared extraction: {changed[:5]}; copy it first"


def build_cache(
    root: CacheRoot,
    lengths: list[int],
    widths: dict[int, int],
    shard_size: int = 3,
    chunk_rows: int = 8,
    commit: bool = True,
    splits: list[str] | None = None,
    key: str = KEY,
    label_shift: float = 0.0,
    **layout: object,
) -> tuple[dict[int, list[np.ndarray]], StoreLayout]:
    """A committed (or, with commit=False, partial) cache of random fp16 tokens; returns them and the layout.

    ``label_shift``: each token of a label-1 example (odd rows, see :func:`example_table`) is moved by
    +shift, of a label-0 example by -shift, so the labels are learnable from the activations.
    ``layout`` passes through to :class:`StoreLayout` (dtype, codec, chunks_per_file, ...).
    """
    rng = np.random.default_rng(0)
    store_layout = StoreLayout(
        layers=tuple(LayerSpec(layer, width) for layer, width in sorted(widths.items())),
        num_examples=len(lengths),
        max_length=max(lengths),
        shard_size=shard_size,
        chunk_rows=chunk_rows,
        **layout,
    )
    builder = CacheBuilder(root, key)
    builder.create(store_layout, {"label_names": ["a", "b"], "key_fields": {"dataset_fingerprint": "f1"}})
    tokens = {
        layer: [
            (rng.standard_normal((n, w)) + label_shift * (1 if i % 2 else -1)).astype(np.float16)
            for i, n in enumerate(lengths)
        ]
        for layer, w in widths.items()
    }
    for shard in store_layout.shards():
        part = slice(shard.example_start, shard.example_stop)
        write_shard(
            builder.location,
            store_layout,
            shard,
            {layer: np.concatenate(t[part]) for layer, t in tokens.items()},
            lengths[part],
        )
    if commit:
        builder.commit(store_layout, example_table(len(lengths), splits), {})
    return tokens, store_layout


def write_scaled_store(root: CacheRoot, dtype: str, seed: int = 2) -> list[np.ndarray]:
    """A committed one-layer cache of three float32 examples (4, 6 and 2 tokens, width 8), each scaled by a
    random factor so per-token scaling (int8, fp8) has something to preserve, stored as ``dtype``; returns
    the values written."""
    rng = np.random.default_rng(seed)
    lengths = [4, 6, 2]
    values = [rng.standard_normal((n, 8)).astype(np.float32) * rng.uniform(0.1, 10) for n in lengths]
    layout = StoreLayout(
        (LayerSpec(0, 8),), num_examples=3, max_length=6, shard_size=2, chunk_rows=4, dtype=dtype
    )
    builder = CacheBuilder(root, KEY)
    builder.create(layout, {"label_names": ["a", "b"]})
    for shard in layout.shards():
        part = slice(shard.example_start, shard.example_stop)
        write_shard(builder.location, layout, shard, {0: np.concatenate(values[part])}, lengths[part])
    builder.commit(layout, example_table(3), {})
    return values


def example_table(n: int, splits: list[str] | None = None) -> pa.Table:
    return pa.table(
        {
            "example_id": [str(i) for i in range(n)],
            "label": [i % 2 for i in range(n)],
            "split": splits or ["train"] * n,
        }
    )


COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (230, 210, 40)}
CORNERS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}


def write_image_text_csv(folder: Path, n: int = 48, seed: int = 0) -> Path:
    """Image-text pairs as a user keeps them: PNG files plus a CSV of relative paths and captions.

    Each 32x32 image has one colored square (color, corner, size vary) and its caption says exactly
    that, so image-text retrieval is learnable; the label is the color.
    """
    from PIL import Image

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        color, corner, size = rng.choice(list(COLORS)), rng.choice(list(CORNERS)), rng.choice([6, 12])
        pixels = np.full((32, 32, 3), 245, dtype=np.uint8)
        row, col = CORNERS[corner]
        top, left = 2 + row * (28 - size), 2 + col * (28 - size)
        pixels[top : top + size, left : left + size] = COLORS[color]
        name = f"images/{i:03d}.png"
        Image.fromarray(pixels).save(folder / name)
        caption = f"a {'small' if size == 6 else 'large'} {color} square in the {corner}"
        rows.append({"id": f"p{i:03d}", "image": name, "caption": caption, "label": color})
    return write_csv(folder / "pairs.csv", rows)


def random_padded_batch(lengths: list[int], widths: list[int], seed: int = 0):
    """Random hidden states [B, N, D_l] per width, zero on padding, and the [B, N] mask of real tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    hidden = [torch.randn(len(lengths), longest, w, generator=g) for w in widths]
    mask = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    for h in hidden:
        h[~mask] = 0.0
    return hidden, mask
