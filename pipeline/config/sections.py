"""The config's sections about inputs: the dataset (and its split), the backbone, and extraction."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from unipt.pipeline.config.declared import _Strict, affects


class SplitConfig(_Strict):
    """How examples are assigned to train/val/test when the data has no split column."""

    train: float = Field(
        0.8,
        gt=0,
        lt=1,
        description="Fraction of examples (or groups) in train.",
        json_schema_extra=affects("cache"),
    )
    val: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Fraction in val (picks the best epoch).",
        json_schema_extra=affects("cache"),
    )
    test: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Fraction in test (reported, never used to pick).",
        json_schema_extra=affects("cache"),
    )
    group_column: str | None = Field(
        None,
        description="Examples sharing this column's value land in one split (e.g. movie).",
        json_schema_extra=affects("cache"),
    )
    seed: int = Field(0, description="Seed of the split assignment hash.", json_schema_extra=affects("cache"))
    scheme: Literal[1, 2] = Field(
        2,
        description="How examples are grouped when there is neither a split_column nor a group_column. "
        "2 (default): by a hash of each input's content, so identical texts, text pairs or images always "
        "share a split. 1: by example id, so duplicates could land in train and test (runs made before "
        "scheme 2; `unipt rerun` of such a run keeps 1).",
        json_schema_extra=affects("cache"),
    )

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {total:.4f}")
        return self


class DatasetConfig(_Strict):
    source: str = Field(
        ...,
        description="'bundled:rotten_tomatoes', 'bundled:rt_same_movie' (text pairs), 'bundled:bbc_news', "
        "'bundled:rt_movie_score' (regression), "
        "'bundled:mnist_5k' (images), "
        "a .csv/.jsonl/.parquet path, 'hf:NAME[:CONFIG]' (a Hugging Face datasets hub id, or a local "
        "dataset folder) or 'hf-disk:PATH' (a `save_to_disk` folder); hf sources need [hf-datasets]",
        json_schema_extra=affects("cache"),
    )
    revision: str | None = Field(
        None,
        description="hf:NAME sources: the hub revision (a tag, branch or commit) to load; None = the default "
        "branch. Pin a commit for data that cannot change under you.",
        json_schema_extra=affects("cache"),
    )
    text_column: str | None = Field(
        "text",
        description="Column of texts; null for an image-only file (with image_column).",
        json_schema_extra=affects("cache"),
    )
    image_column: str | None = Field(
        None,
        description="Column of image file paths (relative to the data file) or encoded image bytes; "
        "with text_column too, every example is an image-text pair (e.g. for retrieval).",
        json_schema_extra=affects("cache"),
    )
    text_pair_column: str | None = Field(
        None,
        description="Column of second texts: each example is the pair (text, text_pair), encoded together "
        "the way the tokenizer encodes pairs (segment ids and all), for NLI/paraphrase/QA-style tasks.",
        json_schema_extra=affects("cache"),
    )
    label_column: str = Field(
        "label",
        description="Column of labels (class names, or numbers for regression).",
        json_schema_extra=affects("cache"),
    )
    id_column: str | None = Field(
        None,
        description="Column of example ids; None = ids are hashes of the row's content.",
        json_schema_extra=affects("cache"),
    )
    split_column: str | None = Field(
        None,
        description="Column holding train/val/test; else `split` is used.",
        json_schema_extra=affects("cache"),
    )
    split: SplitConfig = SplitConfig()
    limit: int | None = Field(
        None,
        gt=0,
        description="Keep this many examples (a seeded sample) for quick runs.",
        json_schema_extra=affects("cache"),
    )


class BackboneConfig(_Strict):
    name_or_path: str = Field(
        ...,
        description="'bundled:all-minilm-l6-v2', 'bundled:efficientnet-lite0', a local HF folder (text or "
        "vision encoder), or a hub id",
        json_schema_extra=affects("cache"),
    )
    revision: str | None = Field(
        None,
        description="Hub ids: the revision (tag, branch or commit) to load.",
        json_schema_extra=affects("cache"),
    )
    layers: Literal["all"] | list[int] = Field(
        "all",
        description="Hidden states to store: all, or sorted indices (0 = the embeddings), e.g. [0, 3, 6].",
        json_schema_extra=affects("cache"),
    )
    max_length: int = Field(
        128,
        gt=1,
        le=8192,
        description="Tokens per text; longer texts are truncated.",
        json_schema_extra=affects("cache"),
    )
    batch_size: int = Field(
        64,
        gt=0,
        description="Examples per backbone forward during extraction.",
        json_schema_extra=affects(None),
    )
    trust_remote_code: bool = Field(
        False,
        description="Run model code shipped with the weights (only for sources you trust).",
        json_schema_extra=affects(None),
    )
    allow_pickle: bool = Field(
        False,
        description="Also load pickled weights (pytorch_model.bin) when a folder has no safetensors; still "
        "through torch.load(weights_only=True). Off: safetensors only.",
        json_schema_extra=affects(None),
    )

    @field_validator("layers")
    @classmethod
    def _layers_sorted_unique(cls, layers: Literal["all"] | list[int]) -> Literal["all"] | list[int]:
        if layers != "all":
            if not layers:
                raise ValueError("layers must be 'all' or a non-empty list of hidden-state indices")
            if sorted(set(layers)) != list(layers):
                raise ValueError("layers must be sorted and unique, e.g. [0, 3, 6]")
        return layers


class ExtractConfig(_Strict):
    workers: int | Literal["auto"] = Field(
        "auto",
        description="Ray actors; 'auto' = one per GPU, or one CPU worker using all cores.",
        json_schema_extra=affects(None),
    )
    shard_size: int = Field(
        512,
        gt=0,
        description="Examples per shard (the unit of work and of resume).",
        json_schema_extra=affects(None),
    )
    dtype: Literal["float16", "bfloat16", "float32", "int8", "float8_e4m3"] = Field(
        "float16",
        description="Storage dtype; int8 and float8_e4m3 are lossy (per-token scales), see README.",
        json_schema_extra=affects("cache"),
    )
    autocast: Literal["none", "bfloat16", "float16"] = Field(
        "none",
        description="Run the backbone under torch.autocast in this precision: much faster on GPUs, but the "
        "activations differ slightly from fp32, so it is part of the cache key. 'none' computes in fp32.",
        json_schema_extra=affects("cache"),
    )
    # Defaults chosen by benchmarks/cache_codecs.py on real MiniLM activations (see README, Cache format).
    chunk_rows: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="Token rows per Zarr chunk. auto: 4096 up to width 384 (MiniLM), fewer for wider layers "
        "(2048 at 768, 1024 at BERT-large's 1024), so a chunk stays near 3 MiB of float16.",
        json_schema_extra=affects(None),
    )
    codec: Literal["blosc-zstd", "blosc-lz4", "zstd", "lz4", "none"] = Field(
        "none",
        description="Chunk compression. none (the default) is read straight out of memory maps, decoding "
        "nothing (benchmarks/loader_throughput.py); the compressors save ~15% of fp16 bytes, for slow disks "
        "and object stores, and read through Zarr.",
        json_schema_extra=affects(None),
    )
    shuffle: Literal["byte", "bit", "none"] = Field(
        "byte", description="Blosc shuffle filter.", json_schema_extra=affects(None)
    )
    compression_level: int = Field(
        1, ge=0, le=9, description="Codec level (1 = fastest).", json_schema_extra=affects(None)
    )
    blosc_blocksize: int = Field(
        1 << 20,
        ge=0,
        description="Bytes per Blosc block (0 = Blosc's choice, which compresses worse).",
        json_schema_extra=affects(None),
    )
    chunks_per_file: int = Field(
        1,
        gt=0,
        description="Chunks per file; > 1 turns on Zarr's sharding codec (fewer, larger files).",
        json_schema_extra=affects(None),
    )
    views: int = Field(
        1,
        ge=1,
        le=64,
        description="Augmented views per training example (VSE-infinity recipe: random resized crop "
        "0.6-1.0 + flip for images, 20% token mask/replace/delete for texts); view 0 is the input as is, "
        "val/test read only it, and training reads view (epoch + seed) mod views. In the cache key when > 1.",
        json_schema_extra=affects("cache"),
    )
    view_seed: int = Field(
        0,
        ge=0,
        description="Seed of the augmented views (extract.views > 1); part of their identity.",
        json_schema_extra=affects("cache"),
    )
