"""Experiment configuration: a validated YAML file plus ``--set key=value`` overrides.

Unknown keys and wrong types are errors (``extra="forbid"``): a typo in a config must never
silently fall back to a default and produce a different experiment.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from unipt.pipeline.errors import UniptError
from unipt.pipeline.method_names import METHOD_NAMES
from unipt.pipeline.storage import (
    DEFAULT_CACHE_ROOT,
    DEFAULT_REGISTRY,
    DEFAULT_RUNS_ROOT,
    check_no_secrets,
    check_url,
)
from unipt.pipeline.tasks import get_task, task_names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitConfig(_Strict):
    """How examples are assigned to train/val/test when the data has no split column."""

    train: float = Field(0.8, gt=0, lt=1, description="Fraction of examples (or groups) in train.")
    val: float = Field(0.1, ge=0, lt=1, description="Fraction in val (picks the best epoch).")
    test: float = Field(0.1, gt=0, lt=1, description="Fraction in test (reported, never used to pick).")
    group_column: str | None = Field(
        None, description="Examples sharing this column's value land in one split (e.g. movie)."
    )
    seed: int = Field(0, description="Seed of the split assignment hash.")
    scheme: Literal[1, 2] = Field(
        2,
        description="How examples are grouped when there is neither a split_column nor a group_column. "
        "2 (default): by a hash of each input's content, so identical texts, text pairs or images always "
        "share a split. 1: by example id, so duplicates could land in train and test (runs made before "
        "scheme 2; `unipt rerun` of such a run keeps 1).",
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
    )
    revision: str | None = Field(
        None,
        description="hf:NAME sources: the hub revision (a tag, branch or commit) to load; None = the default "
        "branch. Pin a commit for data that cannot change under you.",
    )
    text_column: str | None = Field(
        "text", description="Column of texts; null for an image-only file (with image_column)."
    )
    image_column: str | None = Field(
        None,
        description="Column of image file paths (relative to the data file) or encoded image bytes; "
        "with text_column too, every example is an image-text pair (e.g. for retrieval).",
    )
    text_pair_column: str | None = Field(
        None,
        description="Column of second texts: each example is the pair (text, text_pair), encoded together "
        "the way the tokenizer encodes pairs (segment ids and all), for NLI/paraphrase/QA-style tasks.",
    )
    label_column: str = Field(
        "label", description="Column of labels (class names, or numbers for regression)."
    )
    id_column: str | None = Field(
        None, description="Column of example ids; None = ids are hashes of the row's content."
    )
    split_column: str | None = Field(None, description="Column holding train/val/test; else `split` is used.")
    split: SplitConfig = SplitConfig()
    limit: int | None = Field(
        None, gt=0, description="Keep this many examples (a seeded sample) for quick runs."
    )


class BackboneConfig(_Strict):
    name_or_path: str = Field(
        ...,
        description="'bundled:all-minilm-l6-v2', 'bundled:efficientnet-lite0', a local HF folder (text or "
        "vision encoder), or a hub id",
    )
    revision: str | None = Field(None, description="Hub ids: the revision (tag, branch or commit) to load.")
    layers: Literal["all"] | list[int] = Field(
        "all",
        description="Hidden states to store: all, or sorted indices (0 = the embeddings), e.g. [0, 3, 6].",
    )
    max_length: int = Field(128, gt=1, le=8192, description="Tokens per text; longer texts are truncated.")
    batch_size: int = Field(64, gt=0, description="Examples per backbone forward during extraction.")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the weights (only for sources you trust)."
    )
    allow_pickle: bool = Field(
        False,
        description="Also load pickled weights (pytorch_model.bin) when a folder has no safetensors; still "
        "through torch.load(weights_only=True). Off: safetensors only.",
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
        "auto", description="Ray actors; 'auto' = one per GPU, or one CPU worker using all cores."
    )
    shard_size: int = Field(512, gt=0, description="Examples per shard (the unit of work and of resume).")
    dtype: Literal["float16", "bfloat16", "float32", "int8", "float8_e4m3"] = Field(
        "float16",
        description="Storage dtype; int8 and float8_e4m3 are lossy (per-token scales), see README.",
    )
    autocast: Literal["none", "bfloat16", "float16"] = Field(
        "none",
        description="Run the backbone under torch.autocast in this precision: much faster on GPUs, but the "
        "activations differ slightly from fp32, so it is part of the cache key. 'none' computes in fp32.",
    )
    # Defaults chosen by benchmarks/cache_codecs.py on real MiniLM activations (see README, Cache format).
    chunk_rows: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="Token rows per Zarr chunk. auto: 4096 up to width 384 (MiniLM), fewer for wider layers "
        "(2048 at 768, 1024 at BERT-large's 1024), so a chunk stays near 3 MiB of float16.",
    )
    codec: Literal["blosc-zstd", "blosc-lz4", "zstd", "lz4", "none"] = Field(
        "none",
        description="Chunk compression. none (the default) is read straight out of memory maps, decoding "
        "nothing (benchmarks/loader_throughput.py); the compressors save ~15% of fp16 bytes, for slow disks "
        "and object stores, and read through Zarr.",
    )
    shuffle: Literal["byte", "bit", "none"] = Field("byte", description="Blosc shuffle filter.")
    compression_level: int = Field(1, ge=0, le=9, description="Codec level (1 = fastest).")
    blosc_blocksize: int = Field(
        1 << 20, ge=0, description="Bytes per Blosc block (0 = Blosc's choice, which compresses worse)."
    )
    chunks_per_file: int = Field(
        1, gt=0, description="Chunks per file; > 1 turns on Zarr's sharding codec (fewer, larger files)."
    )
    views: int = Field(
        1,
        ge=1,
        le=64,
        description="Augmented views per training example (VSE-infinity recipe: random resized crop "
        "0.6-1.0 + flip for images, 20% token mask/replace/delete for texts); view 0 is the input as is, "
        "val/test read only it, and training reads view (epoch + seed) mod views. In the cache key when > 1.",
    )
    view_seed: int = Field(
        0, ge=0, description="Seed of the augmented views (extract.views > 1); part of their identity."
    )


_AMP_ALIASES = {"bf16": "bfloat16", "fp16": "float16"}  # deprecated train.amp spellings


class TrainConfig(_Strict):
    variant: Literal["transformer", "cnn", "clip4clip"] = Field(
        "transformer",
        description="UniPT variant: transformer (token caches), cnn (CNN feature-map caches; stage grids "
        "must be integer multiples of the last stage's) or clip4clip (token caches; the official "
        "CLIP4Clip form, output added back to the last layer).",
    )
    method: str = Field(
        "unipt",
        description="A registered method (train/methods/): unipt (the paper's parallel network, by "
        "`variant`), lst (Ladder Side-Tuning: a gated side network of width backbone/side_reduction), "
        "scalar_mix (a learned softmax mix of every layer, mean-pooled, then an MLP) or linear_probe (a "
        "linear layer on the last layer's mean-pooled tokens); all train with the same loop, task and head.",
    )
    side_reduction: int = Field(8, gt=0, description="method lst: the side network's width is backbone / r.")
    embed_size: int | None = Field(None, gt=0, description="UniPT output width; default = backbone width.")
    downsample_factor: int = Field(
        2, gt=0, description="UniPT: width of the parallel network = embed_size / this."
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout in the trained network.")
    epochs: int = Field(10, gt=0, description="Training epochs (the best on validation is kept).")
    batch_size: int = Field(64, gt=0, description="Examples per training step.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (warmup, then cosine decay).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps spent warming up the lr.")
    block_examples: int = Field(256, gt=0, description="Examples read per cache block (shuffle unit).")
    view_order: Literal[1, 2] = Field(
        2,
        description="The order a view's examples are read in (and so its blocks and batches). 2 (default): "
        "each split in the order its inputs sit in the segments (segment, then row), whatever the labels "
        "and ids, so a relabelled or partial version reads its segments front to back. 1: the dataset's "
        "order (split, then example id), in which a relabelled version reads a random permutation of "
        "segment rows (runs made before 2; `unipt rerun` of such a run keeps 1).",
    )
    shuffle_buffer_blocks: int = Field(4, gt=0, description="Blocks mixed together when shuffling.")
    loader_memory_mb: int | None = Field(
        512,
        gt=0,
        description="At most this many MiB of float16 rows held by the loader at once (the shuffle window "
        "and the block read ahead): caches with wide or many layers get blocks of fewer "
        "than block_examples examples. null: no cap (the blocks of runs made before it existed).",
    )
    length_grouping: bool = Field(
        True,
        description="Batch training examples of similar length together within each shuffle window (seeded, "
        "a fresh order every epoch): less padding, faster epochs. false reproduces the batches of runs "
        "made before it existed.",
    )
    return_freed_memory: bool = Field(
        True,
        description="After each batch of 32 MiB of float16 activations or more, training hands memory freed "
        "inside the process back to the system (glibc's malloc_trim; the online baseline too, so that "
        "comparisons treat both alike): a lower peak RSS where batches are large "
        "(a BERT-large-shaped cache epoch: ~1,700 MiB instead of ~1,940) for a slower epoch (about 1.2-1.3x "
        "there). Does not change results.",
    )
    reader_threads: int = Field(
        4, gt=0, description="Threads reading a cache block's layers concurrently (does not change results)."
    )
    keep_decoded_mb: Literal["auto"] | NonNegativeInt = Field(
        "auto",
        description="Keep up to this many MiB of the training split's decoded cache blocks in memory from "
        "one epoch to the next, so later epochs skip reading and decoding them (0: off). auto: keep the "
        "whole training split when training runs more than one epoch and its decoded rows fit in "
        "loader_memory_mb (the loader then holds those blocks instead of re-reading them), else nothing "
        "(and nothing on a cache with augmented views, where each epoch reads another view). "
        "Set a size to keep more than loader_memory_mb when RAM allows. Does not change results.",
    )
    loader_background: Literal["auto"] | bool = Field(
        "auto",
        description="Read and pad the next batches in background threads while a step runs (true), or in the "
        "training thread between steps (false). auto: in the background when training on a GPU, which then "
        "need not wait for the CPU; between steps on the CPU, where the step's own threads already use "
        "every core, so reading ahead buys no speed (2 cores: 0.81-0.91 of the pure step either way) "
        "and costs a padded batch and a block of memory (a BERT-large-shaped cache epoch: ~1,600 MiB "
        "peak instead of ~1,650). Does not change results.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Training device; auto = cuda when torch sees a GPU, else cpu (said in the run)."
    )
    linear_probe: bool = Field(
        True,
        description="Also fit the last-layer probe baseline (classification: logistic regression; "
        "regression: ridge), reported beside the trained model; not `train.method: linear_probe`, which "
        "trains a linear layer as the model. The majority-class / mean-predictor baselines are always "
        "reported.",
    )
    task: str = Field(
        "classification",
        description="A registered task (pipeline/tasks.py): classification (accuracy, macro-F1), regression "
        "(numeric label column; MSE; Pearson and Spearman) or retrieval (two backbones' caches of one "
        "dataset; InfoNCE; R@1/5/10, rSum).",
    )
    select_metric: str = Field(
        "auto",
        description="The validation metric that picks the best epoch (and early stopping): one of the task's "
        "metrics (classification: acc, f1). auto = the task's headline metric, except macro-F1 for "
        "classification when the largest class is above 60% of train. The run says which it used.",
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many epochs without a better validation score; None = off."
    )
    amp: Literal["auto", "off", "float16", "bfloat16"] = Field(
        "auto",
        description="Mixed precision on CUDA only (auto = bfloat16 where supported, else float16); the "
        "dtype words of extract.dtype and extract.autocast. bf16/fp16 are deprecated aliases.",
    )
    checkpoint_dir: str | None = Field(
        None, description="Where per-epoch checkpoints go (<dir>/<run_id>/); None = the run's directory."
    )
    retrieval_pair: list[str] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="task retrieval: the [query, gallery] backbone names; default the first two `backbones`.",
    )

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_dtype_word(cls, amp: Any) -> Any:
        if amp is False:  # YAML reads a bare `off` (in a file or a --set override) as false
            return "off"
        # bf16/fp16 were train.amp's own spellings; configs and run records written with them still load.
        if isinstance(amp, str) and amp in _AMP_ALIASES:
            word = _AMP_ALIASES[amp]
            message = f"train.amp {amp!r} is deprecated; write {word!r} (the word extract.dtype uses)"
            warnings.warn(message, DeprecationWarning, stacklevel=2)
            # DeprecationWarning is hidden by default outside __main__ and tests; the user sees the log line.
            logging.getLogger("unipt").warning(message)
            return word
        return amp

    @field_validator("method")
    @classmethod
    def _registered_method(cls, method: str) -> str:
        if method not in METHOD_NAMES:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
        return method

    @field_validator("task")
    @classmethod
    def _registered_task(cls, task: str) -> str:
        if task not in task_names():
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(task_names())}")
        return task

    @model_validator(mode="after")
    def _select_metric_of_the_task(self) -> TrainConfig:
        metrics = get_task(self.task).metrics
        if self.select_metric != "auto" and self.select_metric not in metrics:
            raise ValueError(
                f"select_metric {self.select_metric!r} is not a metric of task {self.task}; choose auto or "
                f"one of {', '.join(metrics)}"
            )
        return self


class StorageConfig(_Strict):
    # Unset, each comes from $UNIPT_HOME (else .unipt), as for commands that take no config.
    cache_root: str = Field(
        default_factory=lambda: DEFAULT_CACHE_ROOT,
        description="A directory or an fsspec URL such as s3://bucket/caches.",
        json_schema_extra={"default_text": "`$UNIPT_HOME/cache`, else `.unipt/cache`"},
    )
    runs_root: str = Field(
        default_factory=lambda: DEFAULT_RUNS_ROOT,
        description="Where run folders (record.json, model, plots) go.",
        json_schema_extra={"default_text": "`$UNIPT_HOME/runs`, else `.unipt/runs`"},
    )
    registry: str = Field(
        default_factory=lambda: DEFAULT_REGISTRY,
        description="SQLite run registry (`unipt runs`, `rerun`, `sweep`).",
        json_schema_extra={"default_text": "`$UNIPT_HOME/registry.sqlite`, else `.unipt/registry.sqlite`"},
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for a URL cache_root (e.g. endpoint_url); credentials come from the "
        "environment, never from here.",
    )

    @field_validator("options")
    @classmethod
    def _no_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        check_no_secrets(options)
        return options

    @field_validator("cache_root")
    @classmethod
    def _no_password_in_the_url(cls, cache_root: str) -> str:
        check_url(cache_root, "storage.cache_root")
        return cache_root


class TrackingConfig(_Strict):
    """Where a run is also reported (the run record and the registry stay the source of truth)."""

    tensorboard: str | None = Field(
        None,
        description="A directory for TensorBoard event files: each run writes <dir>/<run_id>/ (train loss "
        "per step and per epoch, validation metrics per epoch, final metrics, the config, the HPARAMS "
        "view). None = off. Needs [tracking].",
    )
    mlflow: str | None = Field(
        None,
        description="An MLflow tracking URI (http(s)://server, sqlite:///mlflow.db) or a directory (a local "
        "file store): per-epoch and final metrics, the config as params, dataset fingerprint and cache key "
        "as tags, plots and model.safetensors as artifacts, in the experiment named by `name`. None = off. "
        "Needs [tracking].",
    )
    log_every_steps: int = Field(
        10,
        ge=1,
        description="Log the training loss (and learning rate) to the sinks every this many optimiser "
        "steps: the loss curve, beside the per-epoch numbers.",
    )
    mlflow_log_model: bool = Field(
        False,
        description="Also log the tuned model to the MLflow run as an MLflow pyfunc model (artifact "
        "`model/`), which `mlflow.pyfunc.load_model` loads and MLflow's model registry can serve; "
        "it predicts from texts with the backbone model.json names. Needs `mlflow`.",
    )

    @field_validator("mlflow")
    @classmethod
    def _no_password_in_the_uri(cls, uri: str | None) -> str | None:
        if uri is not None:
            check_url(uri, "tracking.mlflow")
        return uri

    @model_validator(mode="after")
    def _a_model_needs_an_mlflow_run(self) -> TrackingConfig:
        if self.mlflow_log_model and self.mlflow is None:
            raise ValueError(
                "tracking.mlflow_log_model logs the model to the run's MLflow run; set tracking.mlflow too "
                "(a tracking URI or a directory)"
            )
        return self


_BACKBONE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


class ExperimentConfig(_Strict):
    name: str = Field(
        description="Experiment name (runs, MLflow).",
        json_schema_extra={"default_text": "the config file's name without `.yaml`"},
    )
    seed: int = Field(0, description="Seed of training (initialisation, shuffling).")
    dataset: DatasetConfig
    backbone: BackboneConfig | None = Field(None, description="The one backbone (or use `backbones`).")
    backbones: dict[str, BackboneConfig] | None = Field(
        None,
        description="Several backbones over the same dataset, by name (e.g. {image: ..., text: ...} for "
        "retrieval); each is extracted once into its own cache. The first one is the primary.",
    )
    extract: ExtractConfig = ExtractConfig()
    train: TrainConfig = TrainConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = Field(
        TrackingConfig(), description="Report runs to TensorBoard and/or MLflow too (off by default)."
    )

    @model_validator(mode="after")
    def _one_backbone_section(self) -> ExperimentConfig:
        if (self.backbone is None) == (self.backbones is None):
            raise ValueError(
                "give exactly one of `backbone` (one model) or `backbones` (a mapping name -> model)"
            )
        if self.backbones is not None:
            if not self.backbones:
                raise ValueError("`backbones` is empty; name at least one model")
            bad = [name for name in self.backbones if not _BACKBONE_NAME.match(name)]
            if bad:
                raise ValueError(
                    f"backbone names {bad} must be letters, digits, '-' or '_' (e.g. text, image)"
                )
        return self

    @model_validator(mode="after")
    def _enough_backbones_for_the_task(self) -> ExperimentConfig:
        if get_task(self.train.task).caches < 2:
            return self
        names = list(self.named_backbones)
        if len(names) < 2:
            raise ValueError(
                f"train.task {self.train.task} needs two backbones over one dataset: name them under "
                "`backbones` (e.g. {image: ..., text: ...})"
            )
        pair = self.train.retrieval_pair or names[:2]
        unknown = [name for name in pair if name not in names]
        if unknown or pair[0] == pair[1]:
            raise ValueError(f"train.retrieval_pair must name two different backbones of {names}, got {pair}")
        return self

    @property
    def retrieval_pair(self) -> tuple[str, str]:
        """(query, gallery) backbone names for task retrieval."""
        pair = self.train.retrieval_pair or list(self.named_backbones)[:2]
        return pair[0], pair[1]

    @property
    def named_backbones(self) -> dict[str, BackboneConfig]:
        """Every backbone by name, the primary first; a single ``backbone`` is named ``main``."""
        if self.backbones is not None:
            return dict(self.backbones)
        assert self.backbone is not None  # the validator guarantees one of the two
        return {PRIMARY_BACKBONE: self.backbone}

    @property
    def primary_backbone(self) -> BackboneConfig:
        return next(iter(self.named_backbones.values()))


PRIMARY_BACKBONE = "main"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.epochs=3`` -> (['train', 'epochs'], 3); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UniptError(f"override {text!r} is not KEY=VALUE; write it like --set train.epochs=3")
    return key.split("."), parse_value(value, f"--set {key}", "--set train.epochs=3")


def parse_value(value: str, where: str, example: str) -> Any:
    """A ``--set``/``--grid`` value as YAML (``3``, ``[0, 3, 6]``, ``null``); one line if it is not."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UniptError(
            f"{where}: value {value!r} is not valid YAML ({problem}); write a number, a list like [0, 3] or "
            f"a plain word, quoting text that starts with a symbol (e.g. {example})"
        ) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UniptError(f"override {text!r}: {part!r} is not a section of the config")
        node[path[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise UniptError(f"config file {path} not found; pass a YAML file such as configs/rt_minilm.yaml")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UniptError(_yaml_problem(path, text, exc)) from None
    if not isinstance(raw, dict):
        raise UniptError(f"config {path} must be a mapping of sections (dataset, backbone, ...)")
    raw = apply_overrides(raw, overrides or [])
    raw.setdefault("name", path.stem)  # a config named my_data.yaml is experiment "my_data"
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise UniptError(f"config {path}: {_describe(exc)}") from exc


def _yaml_problem(path: Path, text: str, exc: yaml.YAMLError) -> str:
    """``config c.yaml line 4, column 1: <problem>; <fix>``: the file's name, not PyYAML's
    ``<unicode string>``, and no raw tab or multi-line excerpt."""
    mark = getattr(exc, "problem_mark", None)
    lines = text.splitlines()
    where = f"config {path}" + (
        f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    )
    line = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
    indent = line[: len(line) - len(line.lstrip())]
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if "\t" in problem or "\t" in indent:
        return f"{where}: YAML does not allow tabs for indentation; indent with spaces"
    return (
        f"{where}: not valid YAML ({problem}); fix that line (YAML nests sections by indenting with spaces)"
    )


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = "unknown key (check the spelling)" if error["type"] == "extra_forbidden" else error["msg"]
        if error["type"] != "extra_forbidden" and isinstance(error.get("input"), (str, int, float)):
            message += f", got {error['input']!r:.40}"  # the value to fix, as it was read
        problems.append(f"{where}: {message}")
    return "; ".join(problems)
