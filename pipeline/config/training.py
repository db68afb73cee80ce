"""The config's ``train`` section: the method, its hyperparameters, the loader, the task, precision."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, NonNegativeInt, field_validator, model_validator

from unipt.pipeline.config.compat import amp_word
from unipt.pipeline.config.declared import _Strict, affects
from unipt.pipeline.method_names import METHOD_NAMES
from unipt.pipeline.tasks import get_task, task_names


class TrainConfig(_Strict):
    variant: Literal["transformer", "cnn", "clip4clip"] = Field(
        "transformer",
        description="UniPT variant: transformer (token caches), cnn (CNN feature-map caches; stage grids "
        "must be integer multiples of the last stage's) or clip4clip (token caches; the official "
        "CLIP4Clip form, output added back to the last layer).",
        json_schema_extra=affects("training"),
    )
    method: str = Field(
        "unipt",
        description="A registered method (train/methods/): unipt (the paper's parallel network, by "
        "`variant`), lst (Ladder Side-Tuning: a gated side network of width backbone/side_reduction), "
        "scalar_mix (a learned softmax mix of every layer, mean-pooled, then an MLP) or linear_probe (a "
        "linear layer on the last layer's mean-pooled tokens); all train with the same loop, task and head.",
        json_schema_extra=affects("training"),
    )
    side_reduction: int = Field(
        8,
        gt=0,
        description="method lst: the side network's width is backbone / r.",
        json_schema_extra=affects("training"),
    )
    embed_size: int | None = Field(
        None,
        gt=0,
        description="UniPT output width; default = backbone width.",
        json_schema_extra=affects("training"),
    )
    downsample_factor: int = Field(
        2,
        gt=0,
        description="UniPT: width of the parallel network = embed_size / this.",
        json_schema_extra=affects("training"),
    )
    dropout: float = Field(
        0.1, ge=0, lt=1, description="Dropout in the trained network.", json_schema_extra=affects("training")
    )
    epochs: int = Field(
        10,
        gt=0,
        description="Training epochs (the best on validation is kept).",
        json_schema_extra=affects("training"),
    )
    batch_size: int = Field(
        64, gt=0, description="Examples per training step.", json_schema_extra=affects("training")
    )
    lr: float = Field(
        1e-3,
        gt=0,
        description="AdamW learning rate (warmup, then cosine decay).",
        json_schema_extra=affects("training"),
    )
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW weight decay.", json_schema_extra=affects("training")
    )
    warmup_ratio: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Fraction of steps spent warming up the lr.",
        json_schema_extra=affects("training"),
    )
    block_examples: int = Field(
        256,
        gt=0,
        description="Examples read per cache block (shuffle unit).",
        json_schema_extra=affects("training"),
    )
    view_order: Literal[1, 2] = Field(
        2,
        description="The order a view's examples are read in (and so its blocks and batches). 2 (default): "
        "each split in the order its inputs sit in the segments (segment, then row), whatever the labels "
        "and ids, so a relabelled or partial version reads its segments front to back. 1: the dataset's "
        "order (split, then example id), in which a relabelled version reads a random permutation of "
        "segment rows (runs made before 2; `unipt rerun` of such a run keeps 1).",
        json_schema_extra=affects("training"),
    )
    shuffle_buffer_blocks: int = Field(
        4, gt=0, description="Blocks mixed together when shuffling.", json_schema_extra=affects("training")
    )
    loader_memory_mb: int | None = Field(
        512,
        gt=0,
        description="At most this many MiB of float16 rows held by the loader at once (the shuffle window "
        "and the block read ahead): caches with wide or many layers get blocks of fewer "
        "than block_examples examples. null: no cap (the blocks of runs made before it existed).",
        json_schema_extra=affects("training"),
    )
    length_grouping: bool = Field(
        True,
        description="Batch training examples of similar length together within each shuffle window (seeded, "
        "a fresh order every epoch): less padding, faster epochs. false reproduces the batches of runs "
        "made before it existed.",
        json_schema_extra=affects("training"),
    )
    return_freed_memory: bool = Field(
        True,
        description="After each batch of 32 MiB of float16 activations or more, training hands memory freed "
        "inside the process back to the system (glibc's malloc_trim; the online baseline too, so that "
        "comparisons treat both alike): a lower peak RSS where batches are large "
        "(a BERT-large-shaped cache epoch: ~1,700 MiB instead of ~1,940) for a slower epoch (about 1.2-1.3x "
        "there). Does not change results.",
        json_schema_extra=affects(None),
    )
    reader_threads: int = Field(
        4,
        gt=0,
        description="Threads reading a cache block's layers concurrently (does not change results).",
        json_schema_extra=affects(None),
    )
    keep_decoded_mb: Literal["auto"] | NonNegativeInt = Field(
        "auto",
        description="Keep up to this many MiB of the training split's decoded cache blocks in memory from "
        "one epoch to the next, so later epochs skip reading and decoding them (0: off). auto: keep the "
        "whole training split when training runs more than one epoch and its decoded rows fit in "
        "loader_memory_mb (the loader then holds those blocks instead of re-reading them), else nothing "
        "(and nothing on a cache with augmented views, where each epoch reads another view). "
        "Set a size to keep more than loader_memory_mb when RAM allows. Does not change results.",
        json_schema_extra=affects(None),
    )
    loader_background: Literal["auto"] | bool = Field(
        "auto",
        description="Read and pad the next batches in background threads while a step runs (true), or in the "
        "training thread between steps (false). auto: in the background when training on a GPU, which then "
        "need not wait for the CPU; between steps on the CPU, where the step's own threads already use "
        "every core, so reading ahead buys no speed (2 cores: 0.81-0.91 of the pure step either way) "
        "and costs a padded batch and a block of memory (a BERT-large-shaped cache epoch: ~1,600 MiB "
        "peak instead of ~1,650). Does not change results.",
        json_schema_extra=affects(None),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Training device; auto = cuda when torch sees a GPU, else cpu (said in the run). A run "
        "may resume on another device, where float sums may differ in their last bits (`unipt rerun` keeps "
        "a CPU run on the CPU).",
        json_schema_extra=affects(None),
    )
    probe_baseline: bool = Field(
        True,
        description="Also fit the last-layer probe baseline (classification: logistic regression; "
        "regression: ridge), reported beside the trained model; not `train.method: linear_probe`, which "
        "trains a linear layer as the model. The majority-class / mean-predictor baselines are always "
        "reported. Formerly `train.linear_probe` (still read).",
        json_schema_extra=affects(None),
    )
    task: str = Field(
        "classification",
        description="A registered task (pipeline/tasks.py): classification (accuracy, macro-F1), regression "
        "(numeric label column; MSE; Pearson and Spearman) or retrieval (two backbones' caches of one "
        "dataset; InfoNCE; R@1/5/10, rSum).",
        json_schema_extra=affects("training"),
    )
    select_metric: str = Field(
        "auto",
        description="The validation metric that picks the best epoch (and early stopping): one of the task's "
        "metrics (classification: acc, f1). auto = the task's headline metric, except macro-F1 for "
        "classification when the largest class is above 60% of train. The run says which it used.",
        json_schema_extra=affects("training"),
    )
    early_stopping_patience: int | None = Field(
        None,
        gt=0,
        description="Stop after this many epochs without a better validation score; None = off.",
        json_schema_extra=affects("training"),
    )
    amp: Literal["auto", "off", "float16", "bfloat16"] = Field(
        "auto",
        description="Mixed precision on CUDA only (auto = bfloat16 where supported, else float16); the "
        "dtype words of extract.dtype and extract.autocast. bf16/fp16 are deprecated aliases.",
        json_schema_extra=affects("training"),
    )
    checkpoint_dir: str | None = Field(
        None,
        description="Where per-epoch checkpoints go (<dir>/<run_id>/); None = the run's directory.",
        json_schema_extra=affects(None),
    )
    retrieval_pair: list[str] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="task retrieval: the [query, gallery] backbone names; default the first two `backbones`.",
        json_schema_extra=affects("training"),
    )

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_dtype_word(cls, amp: Any) -> Any:
        if amp is False:  # YAML reads a bare `off` (in a file or a --set override) as false
            return "off"
        return amp_word(amp)  # bf16/fp16, the old spellings (a file's are upgraded before they get here)

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
