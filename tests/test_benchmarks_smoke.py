"""The issue-7 benchmark scripts' measuring and reporting paths, on tiny synthetic caches: they must not rot.

No timing is asserted: only that every stage runs, counts what it should and writes its files.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import pytest
import torch

from benchmarks import accuracy, cache_size, common, loader_peers, loader_throughput, plot_tradeoff
from tests.conftest import KEY, build_cache
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.reader import CacheReader
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.config import TrainConfig

LENGTHS = [5, 1, 9, 3, 7, 2, 8, 4, 6, 3, 5, 2, 7, 4, 6, 3]
SPLITS = ["train"] * 12 + ["val"] * 2 + ["test"] * 2


@pytest.fixture
def reader(tmp_path) -> CacheReader:
    build_cache(CacheRoot(tmp_path), LENGTHS, {0: 8, 1: 8, 2: 8}, shard_size=4, splits=SPLITS)
    return open_cache(CacheRoot(tmp_path).location(KEY))


def test_cache_size_row_against_fp32_layouts(reader):
    on_disk = reader.nbytes_on_disk()
    row = cache_size.size_row(reader, on_disk, cache_size.activation_bytes(reader))
    tokens, hidden = sum(LENGTHS), 3 * 8
    assert (row["examples"], row["tokens"], row["layers"], row["hidden_total"]) == (16, tokens, 3, hidden)
    assert row["ragged_fp32_bytes"] == tokens * hidden * 4
    assert row["padded_fp32_bytes"] == 16 * row["max_length"] * hidden * 4 >= row["padded_longest_fp32_bytes"]
    assert 0 < row["activation_bytes"] <= on_disk
    assert row["disk_vs_ragged_fp32"] == pytest.approx(on_disk / (tokens * hidden * 4))


@pytest.mark.slow
def test_loader_throughput_measures_every_stage(reader, tmp_path):
    train = TrainConfig(embed_size=8, batch_size=4, block_examples=3, shuffle_buffer_blocks=2, device="cpu")

    result = loader_throughput.measure(reader, train, repeats=1, steps=2, device=torch.device("cpu"))
    stages = {row["stage"]: row for row in result["rows"]}
    assert result["train_examples"] == 12
    names = ["raw read+decode", "numpy copy ceiling", "loader (CacheBatches)"]
    names += ["loader between steps (CPU training)", "peer: memory-mapped Arrow (SAELens-style)"]
    assert all(stages[name]["samples"] == 12 for name in names)
    # zarrs is optional (not a dependency): with it installed this local float16 cache gets its row too.
    if importlib.util.find_spec("zarrs") is not None:
        assert stages["raw read+decode (zarrs pipeline)"]["samples"] == 12 and result["zarrs_over_raw"] > 0
    else:
        assert "raw read+decode (zarrs pipeline)" not in stages
    assert stages["numpy copy ceiling"]["mb_per_s"] > 0 and result["raw_over_copy_ceiling"] > 0
    # The peer's rows are padded to the split's longest example (9 tokens), fp16, three layers of 8.
    assert result["bytes_per_example"]["arrow_peer_padded_to"] == 9
    assert result["bytes_per_example"]["arrow_peer"] > 9 * 3 * 8 * 2
    # Both training passes take the same two batches of 4 (the first two of the repeat's epoch).
    assert stages["UniPT step consumption"]["samples"] == stages["UniPT training from loader"]["samples"] == 8
    assert stages["UniPT step consumption"]["vs_consumption"] == pytest.approx(1.0)
    assert result["consumption_steps"] == 2
    # Sweep trials: each its own process and reader; two read twice the examples in one pass between them.
    assert stages["loader, 1 trial process"]["samples"] == 12
    assert stages["loader, 2 trial processes in parallel (total)"]["samples"] == 24
    assert result["two_trials_over_one"] > 0
    assert stages["raw read+decode through zarr-python (same cache)"]["samples"] == 12
    # The loader before its blocks were views into the maps, for the before/after ratio.
    assert stages["loader, blocks copied out of the maps first (before)"]["samples"] == 12
    assert result["loader_over_loader_copying_blocks"] > 0 and result["loader_over_arrow_peer_cpu"] > 0
    assert result["training_loader_background"] is False  # CPU training reads between steps
    assert stages["UniPT training from loader, reading every epoch"]["samples"] == 8
    assert stages["UniPT training from loader, reading every epoch, other mode"]["samples"] == 8
    # 12 examples of 3 fp16 layers fit the default loader budget, and training runs 10 epochs: kept.
    assert result["training_keeps_decoded_blocks"] is True
    # fp16 rows of the 12 train examples, every layer: the bytes both the raw pass and the loader move.
    assert result["decoded_bytes"] == sum(LENGTHS[:12]) * 3 * 8 * 2
    out = tmp_path / "results" / "loader.json"
    common.write_report(out, {"benchmark": "t", **result}, loader_throughput.COLUMNS, quiet=True)
    assert json.loads(out.read_text())["rows"][0]["stage"] == "raw read+decode"
    assert out.with_suffix(".csv").read_text().splitlines()[0].startswith("stage,samples")


@pytest.mark.slow
def test_without_zarrs_the_benchmark_leaves_its_row_out(reader, monkeypatch):
    monkeypatch.setitem(sys.modules, "zarrs", None)  # what an environment without the package sees
    assert loader_peers.zarrs_reads(reader) is None
    train = TrainConfig(embed_size=8, batch_size=4, block_examples=3, shuffle_buffer_blocks=2, device="cpu")
    result = loader_throughput.measure(reader, train, repeats=1, steps=1, device=torch.device("cpu"))
    assert result["zarrs_over_raw"] is None
    assert "raw read+decode (zarrs pipeline)" not in {row["stage"] for row in result["rows"]}


def test_arrow_peer_delivers_the_loaders_padded_batches(reader, tmp_path):
    train = TrainConfig(embed_size=8, batch_size=4, block_examples=3, shuffle_buffer_blocks=2, device="cpu")
    loader = loader_throughput.loader_for(reader, train)
    peer = loader_peers.ArrowPeer(reader, loader, tmp_path / "peer.arrow")
    theirs = list(peer.batches(1))
    ours = list(loader.epoch(1))
    assert [list(indices) for indices, _, _ in theirs] == [list(batch.indices) for batch in ours]
    for (_, hidden, mask), batch in zip(theirs, ours, strict=True):
        assert torch.equal(mask, batch.mask)
        for a, b in zip(hidden, batch.hidden, strict=True):
            # Both hand the training step the cache's fp16 rows (the step upcasts them).
            assert a.dtype == b.dtype == torch.float16 and torch.equal(a, b)
    # One fixed-size row per example, padded to the longest (9 tokens): more bytes than the ragged rows.
    assert peer.nbytes_on_disk() > 12 * 9 * 3 * 8 * 2 > sum(LENGTHS[:12]) * 3 * 8 * 2
    peer.close()


def test_accuracy_summary_and_tradeoff_plot(tmp_path):
    child = {
        "runs": [
            {"seed": s, "test_acc": a, "val_acc": a, "test_f1": a, "best_epoch": 1, "seconds": 1.0}
            for s, a in enumerate([0.7, 0.8, 0.9])
        ],
        "peak_rss_mib": 900.0,
        "trainable_params": 1000,
        "cache_bytes": 10,
    }
    row = accuracy.summarise("rotten_tomatoes", "unipt-fp16", child)
    assert row["test_acc_mean"] == pytest.approx(0.8) and row["test_acc_std"] == pytest.approx(0.1)
    probe = accuracy.summarise("bbc_news", "linear-probe", child | {"peak_rss_mib": 400.0})
    baselines = {"rows": [{"method": "unipt-online", "test_acc": 0.75, "peak_rss_mib": 1500.0}]}
    report = {"date": "2026-11-26", "machine": {"cpus": 2}, "rows": [row, probe]}
    out = plot_tradeoff.plot(report, baselines, tmp_path / "tradeoff.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_append_keeps_other_rows(tmp_path):
    out = tmp_path / "accuracy.json"
    old = {"settings": {"limit": 1000}, "datasets": {"rotten_tomatoes": {"examples": 1000}, "bbc_news": {}}}
    old["rows"] = [
        {"dataset": "bbc_news", "method": "full-finetune"},
        {"dataset": "bbc_news", "method": "unipt-fp16"},
        {"dataset": "rotten_tomatoes", "method": "linear-probe"},
    ]
    out.write_text(json.dumps(old))
    args = argparse.Namespace(
        config="configs/rt_minilm.yaml",
        limit=500,
        epochs=2,
        finetune_epochs=None,
        max_length=128,
        seeds=[0],
        set=[],
        out=str(out),
        append=True,
        datasets=["bbc_news"],
        methods=["full-finetune"],
    )
    new = [{"dataset": "bbc_news", "method": "full-finetune", "new": True}]
    merged = accuracy.report(args, {"bbc_news": {"examples": 500}}, [], new)
    assert [(r["dataset"], r["method"], r.get("new")) for r in merged["rows"]] == [
        ("rotten_tomatoes", "linear-probe", None),
        ("bbc_news", "unipt-fp16", None),
        ("bbc_news", "full-finetune", True),
    ]
    assert merged["rows"][0]["settings"] == {"limit": 1000}  # the run that made it
    assert merged["rows"][2]["settings"]["limit"] == 500
    assert merged["datasets"]["rotten_tomatoes"] == {"examples": 1000}
