"""Bad inputs through the real CLI: each is one `unipt: error:` line (exit 2) naming the problem and the fix,
with no traceback, and leaves no cache (committed or partial) and no run record behind.

Every test drives ``unipt.pipeline.cli.app.main`` in-process, as `unipt run/extract/train` would run. Errors
in the data or the config stop before Ray starts; the ones that need a backbone (layer range, long
texts) run the real Ray extraction on the tiny BERT of tests/conftest.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import Extraction, make_sentiment_rows, write_config, write_csv
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cli.app import main


def _error_line(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run `unipt ARGV`; it must fail with exit 2 and exactly one error line, and no traceback."""
    code = main([*argv, "--no-progress"])
    _, err = capsys.readouterr()
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("unipt: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    return errors[0]


def _nothing_left(root: Path) -> None:
    caches = CacheRoot(root / "cache")
    assert caches.keys() == [] and caches.partial_keys() == []
    assert not list((root / "runs").glob("*/record.json"))


def _config(tmp_path: Path, tiny_bert_dir: Path, rows: list[dict] | None = None, **sections) -> Path:
    data = tmp_path / "data.csv"
    if rows is not None:
        write_csv(data, rows)
    elif not data.exists():
        write_csv(data, make_sentiment_rows(60))
    return write_config(tmp_path / "config.yaml", str(data), str(tiny_bert_dir), tmp_path, **sections)


# --- the data ------------------------------------------------------------------------------------------


def test_missing_input_file(tmp_path, tiny_bert_dir, capsys):
    config = write_config(tmp_path / "c.yaml", str(tmp_path / "nope.csv"), str(tiny_bert_dir), tmp_path)
    line = _error_line(capsys, "run", str(config))
    assert "nope.csv not found; set dataset.source to an existing" in line
    _nothing_left(tmp_path)


@pytest.mark.parametrize(("setting", "column"), [("text_column", "body"), ("label_column", "stars")])
def test_missing_text_or_label_column(tmp_path, tiny_bert_dir, capsys, setting, column):
    config = _config(tmp_path, tiny_bert_dir, dataset={setting: column})
    line = _error_line(capsys, "run", str(config))
    assert f"column '{column}' not found" in line and "(columns: id, text, label)" in line
    assert f"set dataset.{setting}" in line
    _nothing_left(tmp_path)


def test_empty_text(tmp_path, tiny_bert_dir, capsys):
    rows = make_sentiment_rows(60)
    rows[7]["text"] = "   "
    line = _error_line(capsys, "run", str(_config(tmp_path, tiny_bert_dir, rows)))
    assert "row 7: text is empty; drop empty rows" in line
    _nothing_left(tmp_path)


@pytest.mark.parametrize("missing", ["", "NaN", "nan"])
def test_missing_or_nan_label(tmp_path, tiny_bert_dir, capsys, missing):
    rows = make_sentiment_rows(60)
    rows[3]["label"] = missing  # pandas writes a missing label as "" (or "NaN" when asked to)
    line = _error_line(capsys, "run", str(_config(tmp_path, tiny_bert_dir, rows)))
    assert "row 3: label is missing (NaN/null/empty); fill or drop unlabelled rows" in line
    _nothing_left(tmp_path)


def test_numeric_labels_with_a_nan(tmp_path, tiny_bert_dir, capsys):
    rows = [{**row, "label": "1" if row["label"] == "pos" else "0"} for row in make_sentiment_rows(60)]
    rows[5]["label"] = "NaN"  # a float column now: the reader turns it into a real NaN
    line = _error_line(capsys, "run", str(_config(tmp_path, tiny_bert_dir, rows)))
    assert "row 5: label is missing" in line
    _nothing_left(tmp_path)


def test_label_never_seen_in_train(tmp_path, tiny_bert_dir, capsys):
    rows = make_sentiment_rows(60)
    for i, row in enumerate(rows):
        row["split"] = "train" if i < 40 else ("val" if i < 50 else "test")
    rows[55]["label"] = "postive"  # a typo that only the test split has: no class to learn it from
    config = _config(tmp_path, tiny_bert_dir, rows, dataset={"split_column": "split"})
    line = _error_line(capsys, "run", str(config))
    assert "label 'postive' occurs in val/test (1 rows) but never in train" in line
    assert "fix or drop those rows" in line
    _nothing_left(tmp_path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_non_utf8_bytes(tmp_path, tiny_bert_dir, capsys, suffix):
    data = tmp_path / f"latin1{suffix}"
    if suffix == ".csv":
        lines = [b"id,text,label"] + [f"r{i},fine text {i},{'ab'[i % 2]}".encode() for i in range(20)]
        lines.append(b"r99,caf\xe9 cr\xe8me,a")  # latin-1, as exported by an old spreadsheet
    else:
        lines = [
            json.dumps({"id": f"r{i}", "text": "fine", "label": "ab"[i % 2]}).encode() for i in range(20)
        ]
        lines.append(b'{"id": "r99", "text": "caf\xe9", "label": "a"}')
    data.write_bytes(b"\n".join(lines) + b"\n")
    config = write_config(tmp_path / "c.yaml", str(data), str(tiny_bert_dir), tmp_path)
    line = _error_line(capsys, "run", str(config))
    assert f"latin1{suffix} is not valid UTF-8" in line and "re-encode it as UTF-8" in line
    _nothing_left(tmp_path)


def test_empty_dataset(tmp_path, tiny_bert_dir, capsys):
    data = tmp_path / "empty.csv"
    data.write_text("id,text,label\n")
    config = write_config(tmp_path / "c.yaml", str(data), str(tiny_bert_dir), tmp_path)
    line = _error_line(capsys, "run", str(config))
    assert "has no examples; check the file and any filters" in line
    _nothing_left(tmp_path)


# --- the config ----------------------------------------------------------------------------------------


def test_config_with_an_unknown_key(tmp_path, tiny_bert_dir, capsys):
    line = _error_line(capsys, "run", str(_config(tmp_path, tiny_bert_dir)), "--set", "train.epoch=3")
    assert "train.epoch: unknown key (check the spelling)" in line
    _nothing_left(tmp_path)


def test_config_with_a_wrong_type(tmp_path, tiny_bert_dir, capsys):
    config = _config(tmp_path, tiny_bert_dir)
    raw = config.read_text().replace("epochs: 12", "epochs: many")
    config.write_text(raw)
    line = _error_line(capsys, "train", str(config))
    assert "train.epochs: Input should be a valid integer" in line and "got 'many'" in line
    _nothing_left(tmp_path)


def test_config_that_is_not_a_mapping(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("- just\n- a list\n")
    line = _error_line(capsys, "run", str(config))
    assert "must be a mapping of sections (dataset, backbone, ...)" in line


# --- caches --------------------------------------------------------------------------------------------


@pytest.fixture
def extracted(shared_extraction: Extraction) -> dict:
    """The session's one real extraction (Ray, tiny BERT): the cache tests below read it, or copy and damage
    it."""
    return {
        "root": shared_extraction.root,
        "config": shared_extraction.config,
        "data": shared_extraction.data,
        "store": shared_extraction.view,
    }


@pytest.mark.slow
def test_cache_built_for_another_dataset_version(extracted, tmp_path, tiny_bert_dir, capsys):
    rows = make_sentiment_rows(60)
    rows[0]["text"] += " (edited)"  # version 2 of the data: one row changed
    config = _config(tmp_path, tiny_bert_dir, rows)
    line = _error_line(capsys, "train", str(config), "--cache", str(extracted["store"]))
    assert "was built for another dataset (fingerprint" in line and "re-extract for this config" in line
    _nothing_left(tmp_path)


@pytest.mark.slow
def test_cache_built_for_another_backbone(extracted, tmp_path, tiny_bert_dir, capsys):
    other = tmp_path / "other-bert"
    shutil.copytree(tiny_bert_dir, other)
    settings = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**settings, "hidden_dropout_prob": 0.3}))
    shutil.copy(extracted["data"], tmp_path / "data.csv")  # the same data, another model
    config = write_config(tmp_path / "c.yaml", str(tmp_path / "data.csv"), str(other), tmp_path)
    line = _error_line(capsys, "train", str(config), "--cache", str(extracted["store"]))
    assert "was built with another backbone" in line or "was built with a" in line, line
    assert "config_sha256" in line and "re-extract for this config" in line
    _nothing_left(tmp_path)


def test_train_without_a_cache_says_to_extract(tmp_path, tiny_bert_dir, capsys):
    line = _error_line(capsys, "train", str(_config(tmp_path, tiny_bert_dir)))
    assert "no cache" in line and "run `unipt extract" in line
    _nothing_left(tmp_path)


@pytest.mark.slow
def test_layer_index_out_of_range(ray_session, tmp_path, tiny_bert_dir, capsys):
    config = _config(tmp_path, tiny_bert_dir)
    line = _error_line(capsys, "extract", str(config), "--set", "backbone.layers=[0, 7]")
    assert "backbone.layers [7] out of range: this backbone has hidden states 0..2" in line
    assert "set backbone.layers to indices in that range" in line
    _nothing_left(tmp_path)


@pytest.mark.slow
def test_truncated_chunk_file(extracted, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(extracted["root"] / "cache", cache, ignore=shutil.ignore_patterns(".partial"))
    # The view reads one segment of its activation space: that Zarr store holds the chunks.
    (segment,) = (cache / "spaces").glob("*/segments/*")
    chunk = segment / "layer_01" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])  # a copy cut short
    args = ["--cache-root", str(cache), "--runs-root", str(tmp_path / "runs")]
    args += ["--registry", str(tmp_path / "registry.sqlite")]  # not the shared extraction's own
    line = _error_line(capsys, "train", str(extracted["config"]), *args)
    assert "layer_01 rows" in line and "could not be read" in line
    assert "run `unipt cache verify" in line and "re-extract if it is damaged" in line
    assert not (tmp_path / "runs").exists()  # no run record for a run that did not finish


# --- long texts: not an error, a warning -------------------------------------------------------------------


@pytest.mark.slow
def test_a_100k_character_text_is_truncated_with_one_warning(ray_session, tmp_path, tiny_bert_dir, capsys):
    rows = make_sentiment_rows(60)
    rows[2]["text"] = "great " * 16_667  # 100,001 characters once the trailing space is stripped
    rows[40]["text"] = "dull " * 20_000  # another shard: still one warning for the whole extraction
    config = _config(tmp_path, tiny_bert_dir, rows, extract={"shard_size": 16})
    assert main(["extract", str(config), "--no-progress"]) == 0
    _, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("unipt: warning:")]
    assert len(warnings) == 1, err
    assert "2 text(s) longer than backbone.max_length (32 tokens) were truncated" in warnings[0]
    assert "the longest has 100,001 characters" in warnings[0]
    (key,) = CacheRoot(tmp_path / "cache").keys()
    reader = open_cache(tmp_path / "cache" / key)
    ids = reader.examples.column("example_id").to_pylist()
    lengths = dict(zip(ids, reader.examples.column("length").to_pylist(), strict=True))
    assert lengths["r0002"] == lengths["r0040"] == 32  # cut to max_length, [CLS] ... [SEP]
    assert max(n for i, n in lengths.items() if i not in ("r0002", "r0040")) < 32


# --- training checkpoints: a damaged one to resume from, a full disk to write one to --------------------


@pytest.mark.slow
def test_resume_from_a_checkpoint_missing_keys(extracted, tmp_path, capsys):
    import torch

    args = ["--runs-root", str(tmp_path / "runs"), "--registry", str(tmp_path / "registry.sqlite")]
    assert main(["train", str(extracted["config"]), *args, "--no-progress"]) == 0
    (checkpoint,) = (tmp_path / "runs").glob("*/checkpoint.pt")
    state = torch.load(checkpoint, weights_only=True)
    del state["identity"]
    torch.save(state, checkpoint)
    line = _error_line(capsys, "train", str(extracted["config"]), *args, "--resume", str(checkpoint.parent))
    assert f"checkpoint {checkpoint} lacks identity" in line and "train without --resume" in line


def _with_file_size_limit(limit: int):
    """What a full disk does to a writer: writes past ``limit`` bytes fail with an OSError (EFBIG)."""
    import resource
    import signal

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.faults
def test_training_onto_a_full_disk_leaves_no_half_written_checkpoint(extracted, tmp_path):
    import subprocess
    import sys

    runs = tmp_path / "runs"
    args = ["--runs-root", str(runs), "--registry", str(tmp_path / "registry.sqlite"), "--no-progress"]
    # The tiny model's checkpoint is ~90 KB (weights, optimizer state, best weights); its other files
    # are under 25 KB: the checkpoint is what hits the limit.
    result = subprocess.run(
        [sys.executable, "-m", "unipt.pipeline.cli", "train", str(extracted["config"]), *args],
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_with_file_size_limit(60_000),
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("unipt: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "could not write the checkpoint" in lines[0] and "free space there" in lines[0]
    assert not list(runs.rglob(".*.tmp")) and not list(runs.rglob("checkpoint.pt"))
    assert not list(runs.glob("*/record.json"))  # no record of a run that did not finish
