"""Training with the backbone in memory: the baselines that training from a cache is measured against.

- ``unipt-online``: what the paper's code does. The frozen backbone runs (under ``torch.no_grad``) on
  every batch of every epoch to produce the hidden states, which feed the same UniPT model as training
  from a cache (:func:`unipt.train.methods.build_model` for ``train.variant``), with the same head, optimiser,
  schedule and best-on-validation selection (:func:`unipt.train.loop.fit_head`).
- ``full-finetune``: the backbone itself is trained, with a linear layer on its last hidden state
  (masked mean) into the task's head, AdamW at a smaller learning rate (``train.lr / 10`` unless given).

Both train ``train.task`` through the seam a cache run uses: the task's head (loss, outputs, metrics:
:func:`unipt.train.tasks.task_head`, the registry's ``head``) built from the same label names and train-split
labels, and the best epoch picked by the same validation metric (:func:`unipt.train.loop.selection`), so an
online run reports the metric names of the cache run of its task (classification: acc, f1; regression:
mse, pearson, spearman). A task that is not one model with one head (retrieval) has no online baseline.

Both walk the examples in exactly the batches that :class:`~unipt.train.loader.CacheBatches` would give
from a cache of the same dataset: the same block plan (:func:`unipt.train.block_plan.plan_blocks`, over the
rows extraction would give each example) and the same seeded order
(:func:`unipt.train.block_plan.epoch_order`), so a run online and a run from a float32 cache see the same
batches in the same order.

The baselines hold a backbone and a trainer at once, so they sit beside the recipe
(:mod:`unipt.pipeline.experiment.recipe`), the one place allowed to import both stages; stage 1 never imports
``train/``, and ``train/`` never imports this module.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from benchmarks.resources import peak_cuda_mib, peak_rss_mib
from unipt.extract.backbones import HFTextBackbone
from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline.cache.layout import LayerSpec, StoreLayout, resolve_chunk_rows
from unipt.pipeline.cache.space import virtual_layout
from unipt.pipeline.config import BackboneConfig, ExtractConfig, TrainConfig
from unipt.pipeline.data.bundled import bundled_cnn_settings
from unipt.pipeline.data.table import backbone_inputs
from unipt.pipeline.errors import UniptError
from unipt.pipeline.tasks import get_task
from unipt.train.block_plan import blocks_held, budgeted_block_examples, epoch_order, plan_blocks
from unipt.train.fit import amp_dtype, precision
from unipt.train.loader import BUDGETED_PREFETCH_BLOCKS, Batch, return_memory_after
from unipt.train.loop import TrainOptions, TrainResult, fit_head, pick_device, selection
from unipt.train.methods import build_model
from unipt.train.methods.unipt.transformer import masked_mean
from unipt.train.padding import padding_mask
from unipt.train.tasks import task_head

METHODS = ("unipt-online", "full-finetune")


@dataclass
class OnlineIndex:
    """What a cache of the dataset would say about itself, without its activations.

    Layers, widths, labels and splits are the dataset's and backbone's: enough to size the model
    (:func:`unipt.train.methods.build_model` reads these fields as it reads a cache's). ``offsets`` are the
    rows a cache's view gives each example (back to back, :mod:`unipt.pipeline.cache.view`), so the block
    plan, and therefore the seeded shuffle, is that of a real cache.
    """

    source: str
    layers: list[int]
    hidden_sizes: dict[int, int]
    label_names: list[str]
    examples: pa.Table  # example_id, label, split
    lengths: np.ndarray  # [num_examples] token counts
    offsets: np.ndarray  # [num_examples, 2] row ranges, as a cache's token layers share them

    @classmethod
    def laid_out(
        cls,
        table: pa.Table,
        label_names: list[str],
        lengths: list[int],
        layers: list[int],
        width: int,
        max_length: int,
        extract: ExtractConfig,
    ) -> OnlineIndex:
        """The index of ``table`` as extraction with ``extract``'s shard layout would store it."""
        specs = tuple(LayerSpec(layer, width) for layer in layers)
        layout = StoreLayout(
            layers=specs,
            num_examples=len(lengths),
            max_length=max_length,  # the row budget per example, as extraction reserves it
            shard_size=extract.shard_size,
            chunk_rows=resolve_chunk_rows(extract.chunk_rows, [spec.width for spec in specs]),
            chunks_per_file=extract.chunks_per_file,
        )
        counts = np.asarray(lengths, dtype=np.int64)
        return cls(
            source="online (no cache)",
            layers=list(layers),
            hidden_sizes={layer: width for layer in layers},
            label_names=list(label_names),
            examples=table.select(["example_id", "label", "split"]),
            lengths=counts,
            # A format-4 cache is read through a view whose rows sit back to back (no shard gaps).
            offsets=virtual_layout(layout, len(counts)).offsets(specs[0], counts),
        )

    def layer_spec(self, layer: int) -> LayerSpec:
        return LayerSpec(layer, self.hidden_sizes[layer])  # token sequences: no grid

    def split_indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.examples.column("split").to_numpy(zero_copy_only=False) == split)

    def labels(self) -> np.ndarray:
        return self.examples.column("label").to_numpy()


class OnlineBatches:
    """Batches of one split, computed from the text on every pass (an ``EpochData`` for the loop).

    ``inputs(features, mask)`` turns the padded tokenizer output of a batch into ``Batch.hidden``:
    the backbone's hidden states for UniPT online, or the token ids themselves for fine-tuning.
    """

    def __init__(
        self,
        data: OnlineData,
        split: str,
        config: TrainConfig,
        seed: int,
        shuffle: bool,
        inputs: Callable[[dict, Tensor], list[Tensor]],
    ) -> None:
        self.data, self.config, self.seed, self.shuffle, self.inputs = data, config, seed, shuffle, inputs
        self.indices = data.index.split_indices(split)
        # Blocks as the cache loader cuts them for the same examples (same tokens, same layer widths).
        index = data.index
        width = sum(index.hidden_sizes[layer] for layer in index.layers)
        tokens = float(np.mean(index.lengths[self.indices])) if len(self.indices) else 0.0
        block_examples = budgeted_block_examples(
            config.block_examples,
            tokens * width,
            config.loader_memory_mb,
            blocks_held=blocks_held(BUDGETED_PREFETCH_BLOCKS, config.shuffle_buffer_blocks),
        )
        self.blocks = plan_blocks(self.indices, [index.offsets], block_examples)
        self.labels = data.index.labels()

    def __len__(self) -> int:
        return -(-len(self.indices) // self.config.batch_size)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        lengths = self.data.index.lengths
        order = epoch_order(
            self.blocks,
            lambda block: lengths[block].tolist(),
            self.config.batch_size,
            self.shuffle,
            seed=self.seed,
            epoch=epoch,
            shuffle_buffer_blocks=self.config.shuffle_buffer_blocks,
            prefetch_blocks=0,  # a block "read" is a lookup: no thread to hide it behind
            # Grouped by length exactly as the cache loader groups the same examples (a fair comparison).
            lengths=lengths if self.config.length_grouping and self.shuffle else None,
        )
        for examples in order:
            indices = np.array([index for index, _ in examples], dtype=np.int64)
            mask = padding_mask([length for _, length in examples]).to(self.data.device)
            batch = Batch(
                hidden=self.inputs(self.data.pad(indices), mask),
                mask=mask,
                labels=torch.from_numpy(self.labels[indices]),
                indices=indices,
            )
            if self.config.return_freed_memory:  # as the cache loader does: the same allocator for both
                return_memory_after(batch)
            yield batch


@dataclass
class OnlineData:
    """A dataset tokenized once, the frozen backbone that reads it, and the cache it stands in for."""

    backbone: HFTextBackbone
    encoded: dict[str, list[list[int]]]
    index: OnlineIndex
    device: torch.device
    setup_seconds: float

    @property
    def layers(self) -> list[int]:
        return self.index.layers

    def pad(self, indices: np.ndarray) -> dict[str, Tensor]:
        features = self.backbone.tokenizer.pad(
            {key: [values[i] for i in indices] for key, values in self.encoded.items()}, return_tensors="pt"
        )
        return {key: value.to(self.device) for key, value in features.items()}

    def batches(
        self,
        split: str,
        shuffle: bool,
        config: TrainConfig,
        seed: int,
        inputs: Callable[[dict, Tensor], list[Tensor]],
    ) -> OnlineBatches:
        """One split in the batches training would read from a cache (``inputs`` fills them)."""
        return OnlineBatches(self, split, config, seed, shuffle, inputs)

    @torch.no_grad()
    def hidden_states(
        self, features: dict[str, Tensor], mask: Tensor, amp: torch.dtype | None = None
    ) -> list[Tensor]:
        """The frozen backbone's requested hidden states, zero on padding (as a cache batch has them),
        computed under ``amp``: the autocast dtype training runs in. Set here, because the loop draws
        training batches outside its autocast and validation batches inside it."""
        with precision(self.device, amp):
            out = self.backbone.model(**features, output_hidden_states=True, return_dict=True)
        keep = mask[..., None].to(torch.float32)
        return [out.hidden_states[layer].to(torch.float32) * keep for layer in self.layers]

    def token_inputs(self, features: dict[str, Tensor], mask: Tensor) -> list[Tensor]:
        return [features[key] for key in self.encoded]


def load_online_data(
    dataset_table: pa.Table,
    label_names: list[str],
    backbone_config: BackboneConfig,
    train_config: TrainConfig,
    extract_config: ExtractConfig | None = None,
) -> OnlineData:
    """Load the backbone onto the training device and tokenize every example once, as extraction does."""
    if "text" not in dataset_table.column_names:
        raise UniptError("online baselines take text datasets; this one has no `text` column (images?)")
    if bundled_cnn_settings(backbone_config.name_or_path) is not None:
        raise UniptError("online baselines take Hugging Face text encoders, not the bundled CNN")
    check_task(train_config.task, dataset_table.column("label").to_numpy())
    started = time.perf_counter()
    device = pick_device(train_config.device)
    spec = BackboneLoadSpec(
        backbone_config.name_or_path,
        backbone_config.revision,
        backbone_config.trust_remote_code,
        device=device.type,
        allow_pickle=backbone_config.allow_pickle,
    )
    backbone = HFTextBackbone(spec)
    # A cache holds each example's real tokens first, then padding: pad on the right to match.
    backbone.tokenizer.padding_side = "right"
    count = backbone.num_hidden_states
    layers = list(range(count)) if backbone_config.layers == "all" else list(backbone_config.layers)
    if any(not 0 <= layer < count for layer in layers):
        raise UniptError(
            f"backbone.layers {layers} out of range: this backbone has hidden states 0..{count - 1}"
        )
    # Text pairs are tokenized as pairs, exactly as extraction does (segment ids included).
    inputs = backbone_inputs(dataset_table, "text")
    encoded = dict(backbone._tokenize(inputs, backbone_config.max_length))
    accepted = backbone._accepts  # the inputs its forward names, as in extraction
    encoded = {key: value for key, value in encoded.items() if accepted is None or key in accepted}
    index = OnlineIndex.laid_out(
        dataset_table,
        label_names,
        [len(ids) for ids in encoded["input_ids"]],
        layers,
        backbone.hidden_size,
        backbone_config.max_length,
        extract_config or ExtractConfig(),
    )
    return OnlineData(backbone, encoded, index, device, setup_seconds=time.perf_counter() - started)


def check_task(task: str, labels: np.ndarray) -> None:
    """Refuse a task with no online baseline, or labels that are not the kind the task trains on."""
    info = get_task(task)
    if info.head is None:
        raise UniptError(
            f"online baselines (unipt-online, full-finetune) train one model with one head and train.task "
            f"{task!r} is not that; train it from its caches (unipt run), or set train.task: "
            "classification or regression"
        )
    numeric = bool(np.issubdtype(labels.dtype, np.floating))
    if numeric != (info.label_kind == "numeric"):
        held = "numeric" if numeric else "class"
        raise UniptError(
            f"train.task is {task!r} but the dataset holds {held} labels; load the dataset with the "
            "config's train.task (unipt.pipeline.data.table.load_dataset(..., task=...))"
        )


class FineTuneModel(nn.Module):
    """The backbone, trained, with a linear layer from the masked mean of its last hidden state to the
    task head's outputs (class logits, or one standardised regression value).

    Called like UniPT (``model(hidden, mask)``) so the same loop trains it; here ``hidden`` holds the
    tokenizer's tensors (input ids first) in ``keys`` order.
    """

    def __init__(
        self, backbone: nn.Module, keys: list[str], width: int, num_outputs: int, dropout: float
    ) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(True)
        self.keys = list(keys)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(width, num_outputs)

    def forward(self, hidden: list[Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
        inputs = dict(zip(self.keys, hidden, strict=True))
        tokens = self.backbone(**inputs, return_dict=True).last_hidden_state
        outputs = self.output(self.dropout(masked_mean(tokens, mask)))
        return outputs, outputs.new_zeros(len(outputs), 0)  # no per-layer weights


def fit_online(
    data: OnlineData,
    train_config: TrainConfig,
    seed: int,
    method: str,
    finetune_lr: float | None = None,
    progress: bool = False,
) -> tuple[TrainResult, nn.Module]:
    """Train ``method`` on tokenized ``data``; returns the result and the trained model."""
    if method not in METHODS:
        raise UniptError(f"unknown online method {method!r}; choose one of {', '.join(METHODS)}")
    index = data.index
    check_task(train_config.task, index.labels())
    if data.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(data.device)
    # Seeded after the backbone is loaded, so the model starts exactly as a cache run's does.
    torch.manual_seed(seed)
    if method == "unipt-online":
        amp = amp_dtype(train_config.amp, data.device)
        inputs, config = functools.partial(data.hidden_states, amp=amp), train_config
    else:
        lr = finetune_lr if finetune_lr is not None else train_config.lr / 10
        inputs, config = data.token_inputs, train_config.model_copy(update={"lr": lr})
    splits = [data.batches(s, s == "train", config, seed, inputs) for s in ("train", "val", "test")]
    # The head and the selection a cache run of the task builds from the same labels (train_single_cache).
    train_labels = index.labels()[splits[0].indices]
    head = task_head(get_task(config.task), list(index.label_names), train_labels)
    if method == "unipt-online":
        model = build_model(index, config, num_outputs=head.outputs)
    else:
        width = data.backbone.hidden_size
        model = FineTuneModel(data.backbone.model, list(data.encoded), width, head.outputs, config.dropout)
    options = TrainOptions(progress=progress)
    select = selection(config, train_labels)
    result = fit_head(
        model.to(data.device), *splits, config, head, data.device, options, seed=seed, select=select
    )
    result.metrics.update(
        {
            "lr": config.lr,
            "setup_seconds": data.setup_seconds,
            "backbone_params": sum(p.numel() for p in data.backbone.model.parameters()),
            "peak_rss_mib": peak_rss_mib(),
            "peak_cuda_mib": peak_cuda_mib(),
        }
    )
    return result, model


def train_online(
    dataset_table: pa.Table,
    label_names: list[str],
    backbone_config: BackboneConfig,
    train_config: TrainConfig,
    seed: int,
    method: str,
    extract_config: ExtractConfig | None = None,
    finetune_lr: float | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train a baseline with the backbone in memory on a normalized dataset table (its split column).

    ``method`` is ``"unipt-online"`` or ``"full-finetune"`` (see the module docstring). Metrics are
    those of :func:`unipt.train.loop.fit_head` for ``train.task`` (val_* and test_* of the task's metrics,
    best epoch...) plus ``lr``, ``setup_seconds`` (backbone load and
    tokenization), ``backbone_params``, ``peak_rss_mib`` and ``peak_cuda_mib`` (None without CUDA).
    ``extract_config`` gives the shard layout whose batch order to follow (default: the defaults).
    """
    if method not in METHODS:
        raise UniptError(f"unknown online method {method!r}; choose one of {', '.join(METHODS)}")
    data = load_online_data(dataset_table, label_names, backbone_config, train_config, extract_config)
    result, _ = fit_online(data, train_config, seed, method, finetune_lr, progress)
    return result
