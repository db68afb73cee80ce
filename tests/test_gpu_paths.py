"""The CUDA paths, on a machine without a GPU (issue 29): device capabilities are faked with monkeypatch
where torch must believe in a card, and an out-of-memory is injected where a real one cannot happen.
Autocast runs for real in bf16 on the CPU (the ``cpu_autocast`` fixture), and the side-stream prefetch's
ordering runs with recorded streams. What needs a real GPU (the copy actually overlapping a step, a pinned
copy, fused AdamW's kernel, a real OOM) is not run here."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import KEY, build_cache, make_sentiment_rows, save_tiny_bert, write_config, write_csv
from unipt.extract.backbones import HFTextBackbone
from unipt.extract.backbones.base import autocast as extract_autocast
from unipt.extract.spec import BackboneLoadSpec
from unipt.extract.worker import ExtractionWorker, _check_finite
from unipt.pipeline import cuda_support, experiment
from unipt.pipeline.cache.layout import ShardSpec
from unipt.pipeline.cache.reader import CacheReader
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.config import TrainConfig, load_config
from unipt.pipeline.errors import UniptError
from unipt.pipeline.experiment.sweep_resources import default_parallel, gpu_share, trial_resources
from unipt.train import checkpoint as checkpoint_module
from unipt.train import fit as fit_module
from unipt.train.checkpoint import CHECKPOINT_FILE
from unipt.train.fit import Task, _resume_scaler, adamw, amp_dtype, device_reason, fit
from unipt.train.loader import Batch
from unipt.train.loop import TrainOptions, batch_to_device, evaluate, fit_head
from unipt.train.prefetch import OnDevice, host_to_device, pinned_copy
from unipt.train.tasks import train_task

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


@pytest.fixture
def card(monkeypatch):
    """Fake one CUDA card of the given compute capability (torch's answers only: nothing runs on it)."""

    def fake(major: int, minor: int, name: str = "Fake GPU") -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        cuda_support._warn_emulated_bf16.cache_clear()

    yield fake
    cuda_support._warn_emulated_bf16.cache_clear()


# --- precision per card ----------------------------------------------------------------------------------


def test_auto_amp_is_bf16_only_where_the_card_has_bf16_tensor_cores(card, monkeypatch):
    # What misled the old rule: torch counts emulated bf16 as supported.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    card(7, 5, "Tesla T4")
    assert amp_dtype("auto", CUDA) == torch.float16
    card(8, 0, "A100")
    assert amp_dtype("auto", CUDA) == torch.bfloat16
    card(9, 0, "H100")
    assert amp_dtype("auto", CUDA) == torch.bfloat16
    assert amp_dtype("auto", torch.device("cpu")) is None and amp_dtype("off", CUDA) is None


def test_explicit_bf16_on_a_card_that_emulates_it_warns_once(card, caplog):
    card(7, 5, "Tesla T4")
    with caplog.at_level(logging.WARNING, logger="unipt"):
        cuda_support.warn_if_emulated_bf16("train.amp", CUDA)
        cuda_support.warn_if_emulated_bf16("train.amp", CUDA)
        with pytest.warns(UserWarning, match="CUDA"):  # torch's own: no CUDA here to autocast on
            extract_autocast(CUDA, "bfloat16")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "train.amp is bfloat16" in w]) == 1
    assert any("extract.autocast is bfloat16 but Tesla T4 (compute capability 7.5)" in w for w in warnings)
    caplog.clear()
    card(8, 6, "RTX 3090")
    with caplog.at_level(logging.WARNING, logger="unipt"):
        cuda_support.warn_if_emulated_bf16("train.amp", CUDA)
    assert not caplog.records
    assert cuda_support.fast_half(CUDA) == "bfloat16"
    card(7, 0, "V100")
    assert cuda_support.fast_half(CUDA) == "float16"


def test_the_cpu_fallback_reason_names_the_cause(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert device_reason("auto", torch.device("cpu")).startswith("cpu (no GPU visible: torch ")
    assert "is a CPU-only build (torch.version.cuda is None)" in device_reason("auto", torch.device("cpu"))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert "built for CUDA 12.8 but finds no usable device" in device_reason("auto", torch.device("cpu"))
    assert "driver too old" in device_reason("auto", torch.device("cpu"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES hides every GPU" in device_reason("auto", torch.device("cpu"))
    assert device_reason("cpu", torch.device("cpu")) == "cpu (train.device: cpu)"


def test_resume_loads_the_scaler_only_when_both_sides_scale(caplog):
    # A checkpoint written on the CPU (or with bf16 / amp off) holds a disabled scaler's empty state;
    # loading it into an enabled scaler raised "The source state dict is empty".
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    with caplog.at_level(logging.INFO, logger="unipt"):
        _resume_scaler(scaler, {"scaler": {}, "amp": "off"}, "float16", Path("ck.pt"))
    assert scaler.get_scale() == 1024.0
    assert "checkpoint ck.pt was trained with amp off; resuming with amp float16" in caplog.text
    saved = torch.amp.GradScaler("cpu", init_scale=64.0, enabled=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="unipt"):
        _resume_scaler(scaler, {"scaler": saved.state_dict(), "amp": "float16"}, "float16", Path("ck.pt"))
    assert scaler.get_scale() == 64.0 and "resuming with amp" not in caplog.text
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    _resume_scaler(disabled, {"scaler": saved.state_dict(), "amp": "float16"}, "bfloat16", Path("ck.pt"))
    assert not disabled.is_enabled()


def test_the_cuda_rng_is_restored_only_for_the_gpus_that_exist(monkeypatch):
    states = checkpoint_module.rng_states()
    states["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]  # saved on 2
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # resumed with one visible
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state)))
    checkpoint_module.restore_rng_states(states)
    assert [device for device, _ in restored] == [0] and torch.equal(restored[0][1], states["cuda"][0])


def test_the_amp_dtype_is_recorded_in_the_checkpoint_and_the_result(tmp_path):
    build_cache(CacheRoot(tmp_path / "cache"), [4, 5, 3, 6, 2, 5, 4, 3], {0: 8, 1: 8}, shard_size=4)
    reader = CacheReader(CacheRoot(tmp_path / "cache").location(KEY))
    config = TrainConfig(epochs=1, batch_size=4, embed_size=8, amp="auto")
    result = train_task(reader, config, seed=0, progress=False, checkpoint=tmp_path / CHECKPOINT_FILE)
    assert result.amp == "off"  # auto on the CPU: full precision
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["amp"] == "off"


class _Interrupted(Exception):
    pass


def _stop_after_first_epoch(epoch: int, record: dict) -> None:
    raise _Interrupted  # after the epoch's checkpoint is written, as a killed run would leave it


def test_a_run_resumed_where_amp_resolves_to_fp16_loads_no_empty_scaler_and_says_so(
    tmp_path, monkeypatch, caplog
):
    build_cache(CacheRoot(tmp_path / "cache"), [4, 5, 3, 6, 2, 5, 4, 3], {0: 8, 1: 8}, shard_size=4)
    reader = CacheReader(CacheRoot(tmp_path / "cache").location(KEY))
    config = TrainConfig(epochs=2, batch_size=4, embed_size=8, amp="auto")
    path = tmp_path / CHECKPOINT_FILE
    with pytest.raises(_Interrupted):  # epoch 1 in full precision: a disabled scaler's empty state saved
        train_task(
            reader, config, seed=0, progress=False, checkpoint=path, on_epoch_end=_stop_after_first_epoch
        )
    assert torch.load(path, weights_only=True)["amp"] == "off"
    # Resumed on "a card" where auto is fp16 (autocast on the CPU, no bf16): the scaler is enabled now.
    monkeypatch.setattr(fit_module, "AUTOCAST_DEVICES", frozenset({"cuda", "cpu"}))
    monkeypatch.setattr(fit_module, "native_bf16", lambda device: False)
    with caplog.at_level(logging.INFO, logger="unipt"):
        result = train_task(reader, config, seed=0, progress=False, checkpoint=path, resume=path)
    assert f"checkpoint {path} was trained with amp off; resuming with amp float16" in caplog.text
    assert result.amp == "float16" and len(result.history) == 2
    saved = torch.load(path, weights_only=True)
    assert saved["amp"] == "float16" and saved["scaler"]["scale"] > 0  # the enabled scaler's own state


def test_training_out_of_memory_is_one_line_suggesting_a_smaller_batch():
    class Data:
        def __len__(self) -> int:
            return 1

        def epoch(self, epoch: int = 0):
            yield torch.ones(2, 3)

    def loss(batch, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")  # injected

    task = Task(nn.Linear(3, 1), Data(), loss, dict, "acc")
    with pytest.raises(UniptError) as error:
        fit(task, TrainConfig(epochs=1, batch_size=48), 0, torch.device("cpu"), TrainOptions(progress=False))
    message = str(error.value)
    assert "out of GPU memory while training with train.batch_size=48" in message
    assert "lower train.batch_size (e.g. 24)" in message and "\n" not in message


class _RecordsPrecision(nn.Module):
    """Outputs two logits; remembers the dtype its linear layer computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.seen: list[torch.dtype] = []

    def forward(self, hidden, mask):
        out = self.linear(hidden[0].float().mean(1))
        self.seen.append(out.dtype)
        return out, out.new_zeros(len(out), 1)


def _batches(n: int = 3) -> list[Batch]:
    return [
        Batch(
            hidden=[torch.randn(2, 3, 4, dtype=torch.float16), torch.arange(6).reshape(2, 3)],
            mask=torch.ones(2, 3, dtype=torch.bool),
            labels=torch.tensor([0, 1]),
            indices=np.array([2 * i, 2 * i + 1]),
        )
        for i in range(n)
    ]


class _Split:
    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int = 0):
        yield from self.batches


def test_evaluation_runs_in_the_precision_training_ran_in():
    from unipt.pipeline.tasks import get_task
    from unipt.train.tasks import task_head

    model = _RecordsPrecision()
    head = task_head(get_task("classification"), ["neg", "pos"], np.array([0, 1]))
    cpu = torch.device("cpu")
    evaluate(model, _Split(_batches()), cpu, head, ("acc",), torch.bfloat16)
    assert set(model.seen) == {torch.bfloat16}
    model.seen.clear()
    evaluate(model, _Split(_batches()), cpu, head, ("acc",), None)
    assert set(model.seen) == {torch.float32}


def test_rows_are_cast_straight_to_the_autocast_dtype_and_ids_stay_integers():
    (batch,) = _batches(1)
    hidden, mask, labels = batch_to_device(batch, torch.device("cpu"), nn.Identity(), torch.bfloat16)
    assert hidden[0].dtype == torch.bfloat16 and hidden[1].dtype == torch.int64
    assert torch.equal(labels, batch.labels) and mask.dtype == torch.bool
    hidden, _, _ = batch_to_device(batch, torch.device("cpu"), nn.Identity(), None)
    assert hidden[0].dtype == torch.float32


def test_on_device_batches_keep_their_order_and_count_on_the_cpu():
    batches = _batches(3)
    on_cpu = OnDevice.for_device(_Split(batches), lambda b: (b.hidden, b.mask, b.labels), torch.device("cpu"))
    assert on_cpu.streams is None  # no side stream to copy on
    moved = list(on_cpu.epoch())
    assert len(moved) == 3 and all(m[2] is b.labels for m, b in zip(moved, batches, strict=True))


class _RecordedStreams:
    """Streams that log what the prefetcher asks of them, in order (the CUDA ones queue the same calls)."""

    def __init__(self, log: list[str]) -> None:
        self.log, self.on_side, self.markers = log, False, 0

    @contextlib.contextmanager
    def copying(self):
        self.on_side = True
        yield
        self.on_side = False

    def copied(self) -> int:
        assert self.on_side, "a copy's marker is recorded on the side stream"
        self.markers += 1
        return self.markers - 1

    def hand_over(self, marker: int, tensors: list[torch.Tensor]) -> None:
        self.log.append(f"wait {marker}")
        self.log.append(f"recorded {len(tensors)} tensors")


def test_the_next_batch_is_copied_on_the_side_stream_while_the_current_step_runs():
    log: list[str] = []
    streams = _RecordedStreams(log)
    batches = _batches(3)

    def move(batch: Batch):
        assert streams.on_side, "every copy is queued on the side stream"
        log.append(f"copy {int(batch.indices[0]) // 2}")
        return batch.hidden, batch.mask, batch.labels

    for step, (hidden, _, _) in enumerate(OnDevice(_Split(batches), move, streams).epoch()):
        assert hidden is batches[step].hidden
        log.append(f"step {step}")
    # Batch i+1's copy is queued before step i (so it runs beside it); step i waits for copy i only.
    assert log == [
        "copy 0", "copy 1", "wait 0", "recorded 4 tensors", "step 0",
        "copy 2", "wait 1", "recorded 4 tensors", "step 1",
        "wait 2", "recorded 4 tensors", "step 2",
    ]  # fmt: skip
    # Each epoch starts over: nothing is carried from the last epoch's final copy.
    log.clear()
    assert len(list(OnDevice(_Split(batches[:1]), move, streams).epoch())) == 1
    assert log == ["copy 0", "wait 3", "recorded 4 tensors"]


def test_labels_are_pinned_and_copied_without_blocking_only_on_cuda():
    # Pinning needs a CUDA build of torch, so the CUDA branch itself runs only on a GPU machine.
    assert pinned_copy(CUDA) and pinned_copy(torch.device("cuda", 1))
    assert not pinned_copy(torch.device("cpu"))
    labels = torch.tensor([3, 1, 2])
    assert torch.equal(host_to_device(labels, torch.device("cpu")), labels)


class _HostReads(torch.Tensor):
    """A loss that counts every read of its value (or of anything computed from it) by the host."""

    reads = 0
    _READS = (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__float__,
              torch.Tensor.__bool__, torch.Tensor.__format__)  # fmt: skip

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls._READS:
            _HostReads.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_the_loss_is_summed_on_the_device_and_read_once_per_epoch():
    data = _Split(_batches(4))
    model = nn.Linear(4, 1)

    def loss(batch, device):
        out = model(batch.hidden[0].float().mean(1)).squeeze(1)
        return ((out - batch.labels.float()) ** 2).mean().as_subclass(_HostReads), len(batch.labels)

    _HostReads.reads = 0
    task = Task(model, data, loss, dict, "acc")
    result = fit(
        task, TrainConfig(epochs=3, batch_size=2), 0, torch.device("cpu"), TrainOptions(progress=False)
    )
    # One read per epoch's record (the logging interval), not one per step (12 steps).
    assert _HostReads.reads == 3 and len(result.history) == 3
    assert all(h["train_loss"] > 0 for h in result.history)


def test_adamw_is_fused_on_cuda():
    model = nn.Linear(4, 2)  # its parameters stay on the CPU: torch checks only that the kernel exists
    config = TrainConfig(lr=0.01, weight_decay=0.1)
    fused = adamw(model, config, CUDA)
    assert fused.defaults["fused"] is True and fused.defaults["lr"] == 0.01
    assert fused.defaults["weight_decay"] == 0.1
    assert not adamw(model, config, torch.device("cpu")).defaults["fused"]


class _RecordsInputs(nn.Module):
    """Two logits; remembers, per forward, the dtype its rows arrived in and the autocast around it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.seen: list[tuple[str, torch.dtype, bool, torch.dtype]] = []

    def forward(self, hidden, mask):
        phase = "train" if self.training else "eval"
        autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
        self.seen.append((phase, hidden[0].dtype, *autocast))
        out = self.linear(hidden[0].mean(1))
        return out, out.new_zeros(len(out), 1)


@pytest.fixture
def cpu_autocast(monkeypatch):
    """Training autocasts on the CPU too: every AMP path runs for real (in bf16) without a GPU."""
    monkeypatch.setattr(fit_module, "AUTOCAST_DEVICES", frozenset({"cuda", "cpu"}))


def test_rows_reach_the_model_in_the_autocast_dtype_in_training_and_every_evaluation(cpu_autocast):
    from unipt.pipeline.tasks import get_task
    from unipt.train.tasks import task_head

    model = _RecordsInputs()
    head = task_head(get_task("classification"), ["neg", "pos"], np.array([0, 1]))
    config = TrainConfig(epochs=2, batch_size=2, amp="bfloat16")
    cpu = torch.device("cpu")
    result = fit_head(
        model, _Split(_batches(3)), _Split(_batches(2)), _Split(_batches(2)), config, head, cpu,
        TrainOptions(progress=False),
    )  # fmt: skip
    assert result.amp == "bfloat16"
    # 2 epochs x (3 steps + 2 val batches), then test (2) and the report's val (2): all in bf16, fp16
    # rows cast straight to bf16 (not to fp32 and back).
    assert [phase for phase, *_ in model.seen].count("train") == 6 and len(model.seen) == 14
    assert set((dtype, on, autocast) for _, dtype, on, autocast in model.seen) == {
        (torch.bfloat16, True, torch.bfloat16)
    }


def test_the_online_baseline_trains_and_evaluates_in_training_precision(
    cpu_autocast, tmp_path, tiny_bert_dir
):
    from benchmarks.online_baselines import fit_online, load_online_data
    from unipt.pipeline.data.table import load_dataset

    data_csv = write_csv(tmp_path / "data.csv", make_sentiment_rows(100))
    config = load_config(
        write_config(tmp_path / "c.yaml", str(data_csv), str(tiny_bert_dir), tmp_path),
        ["train.amp=bfloat16", "train.epochs=3", "train.early_stopping_patience=null"],
    )
    dataset = load_dataset(config.dataset)
    train = config.train
    online = load_online_data(dataset.table, dataset.label_names, config.backbone, train, config.extract)
    autocast_seen: list[tuple[bool, torch.dtype]] = []
    online.backbone.model.register_forward_hook(
        lambda *_: autocast_seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
    )
    result, _ = fit_online(online, train, seed=0, method="unipt-online")
    assert result.amp == "bfloat16"
    # The backbone ran for every training batch (pulled outside fit's autocast), every validation, the
    # test split and the report's splits: all in bf16.
    assert len(autocast_seen) > 3 * 2 and set(autocast_seen) == {(True, torch.bfloat16)}
    # The report's val split was measured as the selected epoch's val metrics were.
    best = result.history[result.metrics["best_epoch"] - 1]
    confusion = np.array(result.report["val"]["confusion"])
    assert best["val_acc"] == result.metrics["val_acc"]
    assert confusion.trace() / confusion.sum() == pytest.approx(best["val_acc"], abs=1e-6)  # float32
    per_class = result.report["val"]["per_class"].values()
    assert np.mean([c["f1"] for c in per_class]) == pytest.approx(best["val_f1"], abs=1e-6)
    test = np.array(result.report["test"]["confusion"])
    assert test.trace() / test.sum() == pytest.approx(result.metrics["test_acc"], abs=1e-6)


# --- the backbone's precision, non-finite rows, out of memory ---------------------------------------------


def test_a_half_precision_checkpoint_loads_and_computes_in_fp32(tmp_path):
    folder = save_tiny_bert(tmp_path / "bert")
    from transformers import AutoModel

    AutoModel.from_pretrained(folder).half().save_pretrained(folder)  # a model published in fp16
    backbone = HFTextBackbone(BackboneLoadSpec(str(folder), device="cpu"))
    assert {p.dtype for p in backbone.model.parameters()} == {torch.float32}
    bf16 = HFTextBackbone(BackboneLoadSpec(str(folder), device="cpu", autocast="bfloat16"))
    assert {p.dtype for p in bf16.model.parameters()} == {torch.float16}  # autocast asked: as saved


def test_a_non_finite_activation_stops_the_shard_naming_it():
    shard = ShardSpec(shard_id=3, example_start=40, example_stop=43)
    rows = np.zeros((9, 4), dtype=np.float32)
    _check_finite(shard, {0: rows, 2: rows}, [3, 3, 3])  # finite: nothing to say
    rows = rows.copy()
    rows[7, 1] = np.nan  # the third example's second token
    with pytest.raises(UniptError, match=r"shard 3: .*non-finite .* in layer 2 \(example 42\)"):
        _check_finite(shard, {0: np.zeros((9, 4), np.float32), 2: rows}, [3, 3, 3])
    with pytest.raises(UniptError, match=r"layer 0 \(row 5\)"):  # feature maps: no lengths
        _check_finite(shard, {0: np.where(np.arange(9)[:, None] == 5, np.inf, 0.0)}, None)


@pytest.mark.slow
def test_a_backbone_that_computes_nan_stops_extraction_in_one_line_naming_the_shard(tmp_path, ray_session):
    from transformers import AutoModel

    folder = save_tiny_bert(tmp_path / "bert")
    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        model.embeddings.LayerNorm.weight.fill_(float("nan"))  # every activation after the embeddings
    model.save_pretrained(folder)
    data = write_csv(tmp_path / "data.csv", make_sentiment_rows(24))
    config = write_config(tmp_path / "c.yaml", str(data), str(folder), tmp_path, extract={"shard_size": 16})
    prep = experiment.prepare(load_config(config))
    with pytest.raises(UniptError) as error:
        experiment.extract(prep, progress=False)
    message = str(error.value)
    assert re.search(
        r"shard \d+: the backbone produced non-finite activations \(NaN or inf\) in layer \d+ "
        r"\(example \d+\); nothing of this shard was written",
        message,
    ), message
    assert "\n" not in message
    assert not list((tmp_path / "cache").glob("spaces/*/segments/*/zarr.json"))  # no segment committed


class _NeedsSmallBatches:
    """A backbone whose forward pass runs out of memory above ``fits`` examples (an injected OOM)."""

    device = torch.device("cuda", 0)

    def __init__(self, fits: int) -> None:
        self.fits, self.tried = fits, []

    def encode(self, inputs, layers, max_length, batch_size, dtype, **options):
        self.tried.append(batch_size)
        if batch_size > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return f"encoded with {batch_size}"


def _worker(backbone) -> ExtractionWorker:
    worker = ExtractionWorker.__new__(ExtractionWorker)  # no backbone load: the fake stands in
    worker.backbone, worker._batch_limit, worker._largest_fit = backbone, None, 0
    return worker


def test_extraction_halves_its_batch_on_out_of_memory_and_keeps_what_fit():
    backbone = _NeedsSmallBatches(fits=5)
    worker = _worker(backbone)
    assert worker._encode_fitting(0, [], [1], 8, 32, "float32", {}) == ("encoded with 4", 4)
    assert backbone.tried == [32, 16, 8, 4]
    backbone.tried.clear()
    assert worker._encode_fitting(1, [], [1], 8, 32, "float32", {}) == ("encoded with 4", 4)
    assert backbone.tried == [4]  # the next shard starts at the batch that fit
    backbone.fits = 0  # now nothing fits (a longer shard)
    with pytest.raises(UniptError) as error:
        worker._encode_fitting(2, [], [1], 8, 32, "float32", {})
    assert str(error.value).startswith("shard 2 ran out of GPU memory (cuda:0) even with a batch of 1")
    assert "(a batch of 4 fit before)" in str(error.value)
    with pytest.raises(UniptError, match=r"\(none fit\)"):
        _worker(_NeedsSmallBatches(fits=0))._encode_fitting(0, [], [1], 8, 2, "float32", {})


def test_the_extraction_batch_size_is_not_in_the_cache_key():
    # Why a smaller batch may finish a shard: it computes the same rows into the same cache.
    from unipt.pipeline.cache.identity import BackboneIdentity, cache_key_fields
    from unipt.pipeline.config import BackboneConfig, ExtractConfig

    identity = BackboneIdentity("m", None, "w" * 64, "c" * 64, "t" * 64, "/m")
    fields = [
        cache_key_fields(
            "f" * 64, identity, BackboneConfig(name_or_path="m", batch_size=size), ExtractConfig()
        )
        for size in (64, 1)
    ]
    assert fields[0] == fields[1]


@pytest.mark.slow
def test_every_shard_reports_its_device_and_the_cache_records_it(tmp_path, caplog, ray_session):
    data = write_csv(tmp_path / "data.csv", make_sentiment_rows(40))
    config = write_config(
        tmp_path / "c.yaml", str(data), str(save_tiny_bert(tmp_path / "bert")), tmp_path,
        extract={"shard_size": 16},
    )  # fmt: skip
    prep = experiment.prepare(load_config(config))
    with caplog.at_level(logging.INFO, logger="unipt"):
        result = experiment.extract(prep, progress=False)
    result.release()
    want = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert result.stats["devices"] == [want]
    assert f"extraction ran on {want} (extract.autocast: none)" in caplog.text
    # The segment's own attributes (its root zarr.json) keep where and in what precision it was computed.
    (segment,) = (tmp_path / "cache").glob("spaces/*/segments/*/zarr.json")
    extraction = json.loads(segment.read_text())["attributes"]["extraction"]
    assert extraction["devices"] == [want] and extraction["autocast"] == "none"
    assert extraction["compute_dtype"] == ("float16" if prep.config.extract.dtype == "float16" else "float32")


# --- sweeps -----------------------------------------------------------------------------------------------


def test_gpu_shares_fit_every_trial_and_never_exceed_one_gpu():
    assert gpu_share(6, 1) == 0.1666  # 0.1667 (rounded) fits only 5 trials on a GPU
    assert 6 * gpu_share(6, 1) <= 1.0 and 3 * gpu_share(3, 1) <= 1.0
    assert gpu_share(2, 1) == 0.5 and gpu_share(4, 2) == 0.5 and gpu_share(3, 2) == 0.5
    assert gpu_share(1, 4) == 1.0 and gpu_share(2, 8) == 1.0  # never 2 GPUs a trial would not use
    assert gpu_share(4, 0) == 0.0
    assert default_parallel(16, 1) == 2 and default_parallel(16, 4) == 8  # not 16 processes on one GPU
    assert default_parallel(16, 0) == 16


def test_a_sweep_on_a_gpu_machine_runs_a_few_trials_per_gpu_each_with_its_share():
    # A 16-core machine with one 16 GB GPU: 2 trials at a time (not 16), half the GPU and 8 CPUs each.
    assert trial_resources({"CPU": 16.0, "GPU": 1.0}, None, None, 12) == ({"cpu": 8, "gpu": 0.5}, 2)
    assert trial_resources({"CPU": 16.0, "GPU": 4.0}, None, None, 12) == ({"cpu": 2, "gpu": 0.5}, 8)
    assert trial_resources({"CPU": 16.0, "GPU": 1.0}, 6, None, 12) == ({"cpu": 2, "gpu": 0.1666}, 6)
    assert trial_resources({"CPU": 16.0}, None, None, 12) == ({"cpu": 1, "gpu": 0.0}, 12)  # CPUs only
    assert trial_resources({"CPU": 16.0, "GPU": 1.0}, None, None, 1) == ({"cpu": 16, "gpu": 1.0}, 1)
    assert trial_resources({"CPU": 16.0, "GPU": 1.0}, 4, 0, 12) == ({"cpu": 4, "gpu": 0.0}, 4)
    with pytest.raises(UniptError, match="--gpus-per-trial 2 but the Ray cluster has 1 GPU"):
        trial_resources({"CPU": 16.0, "GPU": 1.0}, None, 2, 12)


# --- the GPU check --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use the GPU")
def test_gpu_check_fails_when_nvidia_smi_sees_a_gpu_torch_cannot_use(tmp_path):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: Tesla T4 (UUID: GPU-fake)'\n")  # a driver that sees a card
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "UNIPT_PYTHON": sys.executable}
    result = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu_check.sh"), "--limit", "120"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "nvidia-smi sees GPU 0: Tesla T4" in result.stderr
    assert "is a CPU-only build (torch.version.cuda is None)" in result.stderr
    assert "gpu check:" not in result.stdout  # stopped before the check itself


def test_gpu_check_bounds_setup_and_check_with_one_timeout(tmp_path):
    slow = tmp_path / "python"
    slow.write_text("#!/bin/sh\nsleep 30\n")  # an interpreter (or setup) that hangs
    slow.chmod(0o755)
    env = {**os.environ, "UNIPT_PYTHON": str(slow), "UNIPT_GPU_CHECK_SECONDS": "2"}
    env["PATH"] = "/usr/bin:/bin"  # no nvidia-smi
    result = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 124 and "stopped after 2s (setup and check)" in result.stderr
