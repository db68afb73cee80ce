"""What a cache will cost before it is built: ``unipt plan`` and the free-space check of ``unipt extract``.

The recipe, top to bottom (:func:`plan`):

1. **Sample**: a seeded sample of the dataset (``dataset.limit``) is extracted for real, as float32, into a
   scratch cache root: the same Ray workers, backbone, tokenizer and shard layout as the full job, timed.
2. **Size**: the sample's float32 rows are re-encoded to every storage dtype and compressed with the
   configured codec (in memory), so each dtype's bytes per token are measured, not looked up. Tokens of the
   whole dataset come from the sample's tokens per character (text) or per example (images).
3. **Time**: extraction = the sample's fixed cost (Ray, backbone load) + its forward seconds per token x the
   dataset's tokens. Per epoch (train + val tokens), two rates measured on this machine: the **read rate**
   (decoded GB/s reading the cache's rows: the real cache's when it exists, else the sample's) and the
   **forward rate** (steady tokens/s of the backbone's forward on the *training* device, in this process, on
   training-sized batches as online training computes them:
   :func:`~unipt.pipeline.experiment.forward_timing.forward_rate`). The
   UniPT step's own seconds are UniPT trained on the sample cache (the second epoch, past warm-up) less
   the sample's read time, scaled by tokens. An epoch from the cache = step + read (the epoch's decoded
   bytes at the read rate, not overlapped: an upper bound); online (the backbone on every batch, as the
   paper's code does) = step + the epoch's tokens at the forward rate.
4. **Verdict**: per epoch, which way wins and by how much (and the read rate at which the two would tie);
   the free space at ``storage.cache_root``; whether extract + epochs x cached epoch beats epochs x online
   epoch for ``train.epochs`` (and from how many epochs on it does).

:func:`check_space` is what ``unipt extract``/``run`` call before extracting: nothing when every cache
exists, the worst case (every example ``max_length`` tokens, uncompressed) fits, or the dataset is too
small for a sample to save anything; otherwise a plan, and a one-line refusal when its predicted size
exceeds the free space (``--force`` skips the check).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import zarr
from zarr.storage import MemoryStore

from unipt.pipeline import experiment
from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.cache.encoding import STORAGE_DTYPES, compressors, encode_rows, has_scale
from unipt.pipeline.cache.layout import resolve_chunk_rows, written_ranges
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.config import ExtractConfig
from unipt.pipeline.data.table import TEXT_PAIR_COLUMN
from unipt.pipeline.errors import UniptError
from unipt.pipeline.experiment.cache_size import (
    PER_EXAMPLE_OVERHEAD,
    inputs_per_example,
    tail_padding_bytes,
    worst_case_bytes,
)
from unipt.pipeline.experiment.forward_timing import forward_rate
from unipt.pipeline.experiment.plan_report import BackbonePlan, Plan
from unipt.pipeline.experiment.plan_sample import SAMPLE_EXAMPLES
from unipt.pipeline.experiment.recipe import Prepared, PreparedBackbone
from unipt.pipeline.log import human_bytes, say
from unipt.train.tasks import train_task

# check_space extracts no sample for a dataset this small (its worst case unknown or over the free space):
# predicting would cost about as much as extracting it.
SMALL_DATASET = 2 * SAMPLE_EXAMPLES


# ------------------------------------------------------------------------------------------------ recipe


def plan(
    prep: Prepared,
    *,
    sample: int = SAMPLE_EXAMPLES,
    ray_address: str | None = None,
    progress: bool = False,
) -> Plan:
    """Predict size, extraction and epoch time of ``prep``'s caches from a timed sample (see module doc)."""
    started = time.perf_counter()
    config = prep.config
    result = Plan(
        config_name=config.name,
        cache_root=str(prep.cache_root),
        free_bytes=free_bytes(prep),
        epochs=config.train.epochs,
    )
    scratch = Path(tempfile.mkdtemp(prefix="unipt-plan-"))
    try:
        with _quiet_sample():
            sampled = _sample_prepared(prep, sample, scratch)
            for name, target in prep.backbones.items():
                result.backbones.append(_plan_backbone(prep, sampled, name, target, ray_address, progress))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.sample_s = time.perf_counter() - started
    return result


@contextmanager
def _quiet_sample() -> Iterator[None]:
    """The sample is the plan's own work, not the user's: loading it would repeat the dataset's duplicate
    warning with the sample's counts, and extracting it would say "cache miss" for a scratch cache no run
    uses. Its errors still raise; its progress lines are not said."""
    logger = logging.getLogger("unipt")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_space(
    prep: Prepared, *, force: bool = False, ray_address: str | None = None, progress: bool = False
) -> Plan | None:
    """Refuse (``UniptError``) to extract caches predicted to be larger than the cache root's free space.

    Costs nothing when every cache exists, the root is an object store, even the worst case fits, or the
    dataset has at most :data:`SMALL_DATASET` examples (said in one line); only then is the sample
    extracted (see :func:`plan`). Returns the plan when one was made.
    """
    missing = [b for b in prep.backbones.values() if not prep.cache_root.has(b.key)]
    free = free_bytes(prep)
    if force or not missing or free is None:
        return None
    bound = sum(worst_case_bytes(prep, b) or float("inf") for b in missing)
    if bound <= free:
        return None
    if len(prep.dataset) <= SMALL_DATASET:
        # A sample would be most of the extraction itself. A disk that fills up stops the extraction with
        # one line, keeping its finished shards for the same command to resume.
        say(
            f"{len(prep.dataset)} examples: extracting without predicting the cache size from a sample first "
            f"(the sample would be most of the work; {human_bytes(free)} free at {prep.cache_root})"
        )
        return None
    say(f"only {human_bytes(free)} free at {prep.cache_root}: predicting the cache size from a sample first")
    predicted = plan(prep, ray_address=ray_address, progress=progress)
    if predicted.fits is False:
        dtype = prep.config.extract.dtype
        smallest = min(predicted.backbones[0].bytes_by_dtype.items(), key=lambda item: item[1])
        raise UniptError(
            f"the {dtype} cache needs about {human_bytes(predicted.needed_bytes)} but only "
            f"{human_bytes(free)} is free at {prep.cache_root}; free some space (`unipt cache gc --yes`), "
            f"point storage.cache_root elsewhere, store fewer bytes (extract.dtype={smallest[0]}: "
            f"~{human_bytes(smallest[1])}; or fewer backbone.layers), or pass --force to extract anyway"
        )
    return predicted


def free_bytes(prep: Prepared) -> int | None:
    """Free bytes on the filesystem holding ``storage.cache_root`` (its nearest existing parent)."""
    location = prep.cache_root.root
    if not location.is_local:
        return None
    path = Path(location.fs_path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


# ------------------------------------------------------------------------------------------------ steps


def _sample_prepared(prep: Prepared, sample: int, scratch: Path) -> Prepared:
    """The same experiment on a seeded sample, stored as float32 (every dtype is re-encoded from it) under
    ``scratch``: nothing is written where the real caches go."""
    config = prep.config
    limit = min(sample, config.dataset.limit or sample, len(prep.dataset))
    sampled = config.model_copy(
        update={
            "dataset": config.dataset.model_copy(update={"limit": limit}),
            # One view: the sample measures the cost per input, scaled by the inputs per example after.
            "extract": config.extract.model_copy(update={"dtype": "float32", "views": 1}),
            "storage": config.storage.model_copy(update={"cache_root": str(scratch / "cache")}),
        }
    )
    return experiment.prepare(sampled)


def _plan_backbone(
    prep: Prepared,
    sampled: Prepared,
    name: str,
    target: PreparedBackbone,
    ray_address: str | None,
    progress: bool,
) -> BackbonePlan:
    extraction = experiment.extract(sampled, name, ray_address=ray_address, progress=progress)
    reader = None
    try:
        reader = open_cache(extraction.path)
        lengths = reader.examples.column("length").to_numpy().astype(np.int64)
        sample_tokens = int(lengths.sum())
        tokens = _predicted_tokens(prep, sampled, lengths, target.config.max_length)
        views = inputs_per_example(prep)
        scale = tokens / max(1, sample_tokens) * views
        per_dtype = bytes_by_dtype(reader, prep.config.extract)
        padding = tail_padding_bytes(reader, prep.config.extract, tokens * views, len(prep.dataset) * views)
        sizes = {
            dtype: int(n * scale + padding[dtype] + PER_EXAMPLE_OVERHEAD * len(prep.dataset))
            for dtype, n in per_dtype.items()
        }
        forward = float(extraction.stats.get("forward_s", extraction.seconds))
        fixed = max(0.0, extraction.seconds - max(forward, float(extraction.stats.get("write_s", 0.0))))
        per_token = forward / max(1, sample_tokens)
        trains = target is prep.primary
        epoch = _epoch_rates(prep, sampled, name, reader, lengths) if trains else None
    finally:
        if reader is not None:
            reader.close()  # what follows reads only what it already loaded
        extraction.release()
    cached = prep.cache_root.has(target.key)
    return BackbonePlan(
        backbone=target.config.name_or_path,
        key=target.key,
        cached=cached,
        examples=len(prep.dataset),
        tokens=tokens,
        layers=list(reader.layers),
        widths=[reader.hidden_sizes[layer] for layer in reader.layers],
        sample_examples=len(lengths),
        sample_tokens=sample_tokens,
        bytes_by_dtype=sizes,
        dtype=prep.config.extract.dtype,
        extract_s=0.0 if cached else fixed + per_token * tokens * views,
        fixed_s=fixed,
        forward_s_per_1k_tokens=per_token * 1000,
        **(
            epoch.scaled(prep, tokens) if epoch is not None else {"cache_epoch_s": 0.0, "online_epoch_s": 0.0}
        ),
    )


@dataclass
class _EpochRates:
    """What one epoch costs on the sample, measured: the parts of the per-epoch verdict."""

    sample_fit_tokens: int  # train + val tokens of the sample
    sample_step_s: float  # UniPT's seconds on them, reading excluded
    bytes_per_token: float  # decoded bytes per token of the configured dtype, every layer
    read_gb_s: float
    read_measured_on: str
    forward_tokens_s: float
    forward_device: str

    def scaled(self, prep: Prepared, tokens: int) -> dict[str, float | int | str]:
        """The BackbonePlan fields of a whole-dataset epoch (``tokens``: the dataset's)."""
        fit = int(round(_fit_tokens(prep, tokens)))  # train + val: val is evaluated every epoch
        step = self.sample_step_s * fit / max(1, self.sample_fit_tokens)
        read_bytes = int(self.bytes_per_token * fit)
        read_s = read_bytes / (self.read_gb_s * 1e9) if self.read_gb_s > 0 else float("inf")
        forward_s = fit / self.forward_tokens_s if self.forward_tokens_s > 0 else float("inf")
        return {
            "cache_epoch_s": step + read_s,
            "online_epoch_s": step + forward_s,
            "read_gb_s": self.read_gb_s,
            "read_measured_on": self.read_measured_on,
            "forward_tokens_s": self.forward_tokens_s,
            "forward_device": self.forward_device,
            "epoch_tokens": fit,
            "epoch_read_bytes": read_bytes,
            "step_epoch_s": step,
        }


def _epoch_rates(
    prep: Prepared, sampled: Prepared, name: str, sample: ActivationCache, lengths: np.ndarray
) -> _EpochRates:
    """Measure, on this machine: UniPT's epoch on the sample cache, the read rate (the real cache's when it
    exists) and the backbone's forward rate on the training device."""
    sample_bytes, sample_s = read_rate(sample, examples=sample.num_examples)  # all of it
    sample_fit = _split_tokens(sample, lengths, ("train", "val"))
    epoch_s = _cache_epoch_seconds(sample, prep)
    # The sample epoch read its train + val rows once: take that out to leave UniPT's own step time.
    step_s = max(0.0, epoch_s - sample_s * sample_fit / max(1, int(lengths.sum())))
    # The sample is float32; the configured dtype decodes to float16 (fp16) or float32 (the others).
    per_token = sample_bytes / max(1, int(lengths.sum())) * _decoded_itemsize(prep.config.extract.dtype) / 4
    target = prep.backbones[name]
    measured_on = "sample"
    read_bytes, read_s = sample_bytes, sample_s
    if prep.cache_root.has(target.key):
        real = open_cache(prep.cache_root.location(target.key))
        try:
            read_bytes, read_s = read_rate(real)
            measured_on = "cache"
        finally:
            experiment.release_reader(real)
    tokens_s, device = forward_rate(sampled, name, prep.config, int(lengths.sum()))
    return _EpochRates(
        sample_fit_tokens=sample_fit,
        sample_step_s=step_s,
        bytes_per_token=per_token,
        read_gb_s=read_bytes / read_s / 1e9 if read_s > 0 else 0.0,
        read_measured_on=measured_on,
        forward_tokens_s=tokens_s,
        forward_device=device,
    )


def _decoded_itemsize(dtype: str) -> int:
    """Bytes per value a read hands the loader: float16 for fp16 caches, float32 for the others."""
    return 2 if dtype == "float16" else 4


def read_rate(
    reader: ActivationCache, examples: int = SAMPLE_EXAMPLES, repeats: int = 2
) -> tuple[int, float]:
    """(decoded bytes, seconds) reading every layer's rows of the first ``examples`` examples, the fastest of
    ``repeats`` passes (the first may fill the page cache). Reads as the loader does: block by block."""
    best, total = float("inf"), 0
    for _ in range(repeats):
        total = 0
        started = time.perf_counter()
        for layer in reader.layers:
            offsets = reader.offsets_for(layer)[:examples]
            for a, b in written_ranges(offsets):
                total += reader.read_rows(layer, a, b).nbytes
        best = min(best, time.perf_counter() - started)
    return total, best


def _predicted_tokens(prep: Prepared, sampled: Prepared, lengths: np.ndarray, max_length: int) -> int:
    """The dataset's token count. Text: each example's characters x the sample's tokens per character
    (over examples not cut at ``max_length``), capped at ``max_length``; otherwise the sample's mean."""
    table, sample_table = prep.dataset.table, sampled.dataset.table
    if "text" not in table.column_names:
        return int(round(lengths.mean() * len(table)))
    sample_chars, chars = _characters(sample_table), _characters(table)
    whole = lengths < max_length
    rate = lengths[whole].sum() / max(1.0, sample_chars[whole].sum())
    # Special tokens ([CLS], [SEP]) do not grow with the text: the sample's shortest example bounds them.
    return int(np.minimum(np.maximum(chars * rate, lengths.min()), max_length).sum())


def _characters(table: pa.Table) -> np.ndarray:
    """Each example's characters: its text's, plus its second text's in a text-pair dataset."""
    columns = [c for c in ("text", TEXT_PAIR_COLUMN) if c in table.column_names]
    counts = [[len(t or "") for t in table.column(c).to_pylist()] for c in columns]
    return np.sum(np.array(counts, dtype=np.float64), axis=0)


def _fit_tokens(prep: Prepared, tokens: int) -> float:
    """Train + val share of ``tokens`` (by example counts)."""
    counts = prep.dataset.split_counts()
    return tokens * (counts["train"] + counts["val"]) / max(1, sum(counts.values()))


def _split_tokens(reader: ActivationCache, lengths: np.ndarray, splits: tuple[str, ...]) -> int:
    return int(sum(lengths[reader.split_indices(split)].sum() for split in splits))


def bytes_by_dtype(reader: ActivationCache, ext: ExtractConfig) -> dict[str, int]:
    """A cache's layer arrays (and scales) as each storage dtype would store them, compressed with ``ext``'s
    codec in chunks of ``ext.chunk_rows`` rows: measured bytes, not a table (its small files left out)."""
    totals = dict.fromkeys(STORAGE_DTYPES, 0)
    chunk_rows = resolve_chunk_rows(ext.chunk_rows, list(reader.hidden_sizes.values()))
    for layer in reader.layers:
        rows = np.concatenate(
            [reader.read_rows(layer, a, b) for a, b in written_ranges(reader.offsets_for(layer))]
        )
        rows = rows.astype(np.float32, copy=False)
        for dtype in STORAGE_DTYPES:
            stored, scale = encode_rows(rows, dtype)
            totals[dtype] += _unpadded_compressed_bytes(stored, ext, chunk_rows)
            if has_scale(dtype) and scale is not None:
                totals[dtype] += _unpadded_compressed_bytes(scale, ext, chunk_rows)
    return totals


def _unpadded_compressed_bytes(values: np.ndarray, ext: ExtractConfig, chunk_rows: int) -> int:
    """``values`` stored in chunks of ``chunk_rows`` with the rest in a chunk of its own size: what the rows
    cost without a padded last chunk (:func:`~unipt.pipeline.experiment.cache_size.tail_padding_bytes` adds
    that for the whole dataset)."""
    whole = len(values) // chunk_rows * chunk_rows
    total = _compressed_bytes(values[:whole], ext, chunk_rows) if whole else 0
    if whole < len(values):
        total += _compressed_bytes(values[whole:], ext, len(values) - whole)
    return total


def _compressed_bytes(values: np.ndarray, ext: ExtractConfig, chunk_rows: int) -> int:
    array = zarr.create_array(
        store=MemoryStore(),
        shape=values.shape,
        chunks=(chunk_rows, *values.shape[1:]),
        dtype=values.dtype,
        compressors=compressors(
            ext.codec, ext.shuffle, ext.compression_level, values.dtype.itemsize, ext.blosc_blocksize
        ),
        fill_value=0,
    )
    array[...] = values
    return int(array.nbytes_stored())


def _cache_epoch_seconds(reader: ActivationCache, prep: Prepared) -> float:
    """Seconds of one UniPT epoch (train + val pass) on the sample cache: the second of two, past warm-up."""
    config = prep.config.train.model_copy(
        update={"epochs": 2, "probe_baseline": False, "early_stopping_patience": None}
    )
    result = train_task(reader, config, prep.config.seed, progress=False)
    return float(result.history[-1]["seconds"])
