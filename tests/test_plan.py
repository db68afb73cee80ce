"""``unipt plan``: the predicted cache size is the real one (within 15%), and extraction refuses to start
on a filesystem too small for it (a real tmpfs), unless forced."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli, write_config

from unipt.pipeline import experiment
from unipt.pipeline.config import load_config
from unipt.pipeline.experiment import cache_size, forward_timing, plan_report
from unipt.pipeline.experiment import plan as planning

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rt_minilm.yaml"


def _bytes_under(folder: Path) -> int:
    """What the caches under ``folder`` take: the size of every file (locks and leases are empty)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def small_filesystem(tmp_path: Path):
    """A real 24 MiB tmpfs (needs root, or CAP_SYS_ADMIN, to mount); skipped where it cannot be mounted."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.slow
def test_plan_predicts_every_dtype_and_writes_nothing_where_the_caches_go(tiny_config: Path, tmp_path: Path):
    out = run_cli("plan", str(tiny_config), "--json", "--no-progress", "--sample", "64")
    result = json.loads(out.stdout)
    (backbone,) = result["backbones"]
    sizes = backbone["bytes_by_dtype"]
    # Same values, fewer bits: float32 > float16 and bfloat16 > int8 (which also stores a scale per token).
    assert sizes["float32"] > sizes["float16"] > sizes["int8"]
    assert sizes["float32"] > sizes["bfloat16"] > sizes["int8"]
    assert backbone["dtype"] == "float16" and result["needed_bytes"] == sizes["float16"]
    assert backbone["sample_examples"] == 64 and backbone["examples"] == 240
    assert backbone["tokens"] > backbone["sample_tokens"]
    # The per-epoch verdict: both ways are the same UniPT step plus reading (cache) or the backbone (online),
    # each from a rate measured here; the winner is the faster one, by the ratio of the two.
    step, tokens = backbone["step_epoch_s"], backbone["epoch_tokens"]
    assert (
        backbone["read_gb_s"] > 0 and backbone["forward_tokens_s"] > 0 and backbone["forward_device"] == "cpu"
    )
    assert backbone["read_measured_on"] == "sample" and step >= 0
    # fp16 decodes to 2 bytes per value: 3 hidden states x width 32 per token.
    assert backbone["epoch_read_bytes"] == pytest.approx(tokens * 3 * 32 * 2, rel=0.01)
    assert backbone["cache_epoch_s"] == pytest.approx(
        step + backbone["epoch_read_bytes"] / backbone["read_gb_s"] / 1e9
    )
    assert backbone["online_epoch_s"] == pytest.approx(step + tokens / backbone["forward_tokens_s"])
    fast, slow = sorted((backbone["cache_epoch_s"], backbone["online_epoch_s"]))
    winner = "cache" if backbone["cache_epoch_s"] <= backbone["online_epoch_s"] else "online"
    assert backbone["epoch_winner"] == winner and backbone["epoch_speedup"] == pytest.approx(slow / fast)
    # At the break-even read rate, reading an epoch takes exactly as long as recomputing it.
    even = backbone["break_even_read_gb_s"]
    assert backbone["epoch_read_bytes"] / (even * 1e9) == pytest.approx(tokens / backbone["forward_tokens_s"])
    assert 0 < tokens < backbone["tokens"]  # train + val only
    # The printed plan says the same (rebuilt from the JSON: a second run would measure anew).
    names = {f.name for f in dataclasses.fields(plan_report.BackbonePlan)}
    rebuilt = plan_report.Plan(
        **{k: v for k, v in result.items() if k in {f.name for f in dataclasses.fields(plan_report.Plan)}}
    )
    rebuilt.backbones = [plan_report.BackbonePlan(**{k: v for k, v in backbone.items() if k in names})]
    plain = "\n".join(rebuilt.lines())
    assert f"{backbone['read_gb_s']:.3g} GB/s decoded (measured on the float32 sample cache)" in plain
    assert f"forward {backbone['forward_tokens_s']:,.0f} tokens/s on cpu" in plain
    side = "the cache" if winner == "cache" else "online"
    assert f"per epoch    {side} wins, {backbone['epoch_speedup']:.1f}x faster" in plain
    assert result["fits"] is True and result["free_bytes"] > 0
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.slow
def test_check_space_is_free_when_the_worst_case_fits_or_forced(tiny_config: Path):
    prep = experiment.prepare(load_config(tiny_config))
    worst = cache_size.worst_case_bytes(prep, prep.primary)
    # 240 examples x 32 tokens x (2 layers + embeddings) x width 32 x 2 bytes, plus 1% and the small files.
    assert worst == int(240 * 32 * 3 * 32 * 2 * 1.01) + cache_size.PER_EXAMPLE_OVERHEAD * 240
    assert planning.check_space(prep) is None  # fits by the bound: no sample extracted
    assert planning.check_space(prep, force=True) is None


@pytest.mark.slow
def test_check_space_extracts_no_sample_of_a_dataset_smaller_than_two_samples(tmp_path: Path, capsys):
    """EfficientNet's shape is not in a config.json, so there is no worst case to compare with the free
    space: a small dataset is extracted without a sample (which would be most of it), saying so. (A larger
    one still gets the sample: the refusal on a small filesystem below.)"""

    def prepared(limit: int):
        config = write_config(
            tmp_path / f"mnist{limit}.yaml", "bundled:mnist_5k", "bundled:efficientnet-lite0", tmp_path,
            dataset={"source": "bundled:mnist_5k", "id_column": None, "limit": limit},
        )  # fmt: skip
        return experiment.prepare(load_config(config))

    small = prepared(planning.SMALL_DATASET)
    assert cache_size.worst_case_bytes(small, small.primary) is None
    assert planning.check_space(small) is None
    said = capsys.readouterr().err
    assert f"{planning.SMALL_DATASET} examples: extracting without predicting the cache size" in said
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.slow
def test_predicted_size_is_within_15_percent_of_the_real_cache(tmp_path: Path, ray_session):
    config = load_config(DEFAULT_CONFIG, ["dataset.limit=1500", f"storage.cache_root={tmp_path / 'cache'}"])
    prep = experiment.prepare(config)
    predicted = planning.plan(prep, sample=200)
    with experiment.extract(prep, progress=False) as extraction:
        assert not extraction.cache_hit
        actual_tokens = extraction.tokens
    actual = _bytes_under(tmp_path / "cache")
    (backbone,) = predicted.backbones
    assert abs(backbone.predicted_bytes - actual) / actual < 0.15, (backbone.predicted_bytes, actual)
    assert abs(backbone.tokens - actual_tokens) / actual_tokens < 0.15, (backbone.tokens, actual_tokens)


@pytest.mark.slow
def test_extract_refuses_when_the_cache_cannot_fit_on_a_small_filesystem(small_filesystem: Path):
    args = ["extract", str(DEFAULT_CONFIG), "--set", "dataset.limit=1000", "--no-progress"]
    refused = run_cli(*args, "--cache-root", str(small_filesystem), check=False)
    assert refused.returncode == 2, refused.stderr[-2000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("unipt: error:")]
    assert len(errors) == 1 and refused.stderr.rstrip().endswith(errors[0])
    assert "free at" in errors[0] and "--force" in errors[0] and "float16" in errors[0]
    # Refused before extracting: no cache, no partial store, on the small filesystem.
    assert _bytes_under(small_filesystem) == 0


@pytest.mark.slow
def test_plan_says_the_duplicate_warning_once_and_nothing_of_its_sample(tmp_path: Path, tiny_bert_dir: Path):
    from conftest import make_sentiment_rows, write_csv

    rows = make_sentiment_rows(200)
    repeats = [{**row, "id": f"copy{i}"} for i, row in enumerate(rows[:40])]  # identical inputs again
    data = write_csv(tmp_path / "dups.csv", rows + repeats)
    config = write_config(tmp_path / "dups.yaml", str(data), str(tiny_bert_dir), tmp_path)
    result = run_cli("plan", str(config), "--no-progress", "--sample", "64")
    said = [line for line in result.stderr.splitlines() if line.strip()]
    duplicates = [line for line in said if "occur more than once" in line]
    assert len(duplicates) == 1 and "40 inputs occur more than once (40 extra copies)" in duplicates[0], said
    assert not [line for line in said if "cache miss" in line or "extracted" in line or "cache:" in line]


def test_the_forward_rate_times_only_the_backbones_forward_on_training_batches(
    tiny_config: Path, tiny_bert_dir
):
    """What online training pays per token: batches of train.batch_size padded to their longest input
    (length-sorted under length grouping), tokenized before the clock starts, one warm-up batch of the
    largest shape, then whole passes (two at least) whose fastest gives the rate in real tokens/s."""
    import torch

    from unipt.extract.backbones import HFTextBackbone
    from unipt.extract.spec import BackboneLoadSpec

    base = load_config(tiny_config)
    config = base.model_copy(update={"train": base.train.model_copy(update={"batch_size": 4})})
    backbone = HFTextBackbone(BackboneLoadSpec(str(tiny_bert_dir), device="cpu"))
    texts = [" ".join(["word"] * n) for n in (9, 1, 5, 3, 7, 2, 8, 4, 6, 10)]
    lengths = [len(ids) for ids in backbone.tokenizer(texts)["input_ids"]]
    shapes: list[tuple[int, int]] = []
    model, tokenizer = backbone.model, backbone.tokenizer
    timed = {"tokenized": 0}

    class Recording(torch.nn.Module):  # the real model, its calls' input shapes noted
        def forward(self, **features):
            shapes.append(tuple(features["input_ids"].shape))
            return model(**features)

    class Counting:  # the real tokenizer, its encode calls counted (pad is not an encode)
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kwargs):
            timed["tokenized"] += 1
            return tokenizer(*args, **kwargs)

    backbone.model, backbone.tokenizer = Recording(), Counting()
    rate = forward_timing.steady_forward_rate(backbone, texts, 32, config, torch.device("cpu"))
    assert timed["tokenized"] == 1  # once, before any forward
    ordered = sorted(lengths)
    one_pass = [(len(ordered[i : i + 4]), max(ordered[i : i + 4])) for i in range(0, 10, 4)]  # 4, 4, 2 inputs
    assert shapes[0] == max(one_pass, key=lambda s: s[0] * s[1])  # the warm-up: the largest batch
    passes = (len(shapes) - 1) // len(one_pass)
    assert passes >= 2 and shapes[1:] == one_pass * passes
    assert rate > 0
    # Without length grouping: batches in the inputs' order, each padded to its longest.
    config = config.model_copy(update={"train": config.train.model_copy(update={"length_grouping": False})})
    shapes.clear()
    forward_timing.steady_forward_rate(backbone, texts, 32, config, torch.device("cpu"))
    assert shapes[1:4] == [(4, max(lengths[0:4])), (4, max(lengths[4:8])), (2, max(lengths[8:10]))]
