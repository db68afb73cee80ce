"""Which device trained, and why, is in every run record and on the summary line: a silent CPU fallback
(e.g. a sweep trial that got no GPU) cannot go unnoticed."""

from __future__ import annotations

import json

import pytest
import torch

from unipt.pipeline.cli.app import main
from unipt.pipeline.runs.registry import Registry
from unipt.train.fit import amp_dtype, amp_name, device_reason, pick_device


def test_the_reason_names_the_setting_or_the_missing_gpu():
    assert device_reason("cpu", torch.device("cpu")) == "cpu (train.device: cpu)"
    if not torch.cuda.is_available():
        assert device_reason("auto", pick_device("auto")).startswith("cpu (no GPU visible: ")


@pytest.mark.e2e
def test_run_record_registry_and_summary_say_which_device_trained(tiny_config, tmp_path, capsys, ray_session):
    assert main(["run", str(tiny_config), "--set", "train.epochs=1", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    want = "cpu (no GPU visible: " if not torch.cuda.is_available() else "cuda ("
    assert f"training on {want}" in err
    (summary,) = [line for line in out.splitlines() if " | extract " in line]
    assert f"/epoch) on {want}" in summary
    with Registry(str(tmp_path / "registry.sqlite")) as registry:
        (entry,) = registry.list()
    record = json.loads((tmp_path / "runs" / entry.run_id / "record.json").read_text())
    assert record["runtime"]["device_reason"].startswith(want) and entry.runtime["device_reason"].startswith(
        want
    )
    # The precision train.amp (auto) resolved to on this device: full precision on the CPU.
    assert record["runtime"]["amp"] == amp_name(amp_dtype("auto", pick_device("auto")))
    assert torch.cuda.is_available() or record["runtime"]["amp"] == "off"
    # Where and in what precision the cache it trained on was extracted (each segment's own record).
    stored = record["config"]["extract"]["dtype"]
    assert record["runtime"]["extraction"] == {
        "devices": ["cuda:0" if torch.cuda.is_available() else "cpu"],
        "autocast": [record["config"]["extract"]["autocast"]],
        "compute_dtype": ["float16" if stored == "float16" else "float32"],
    }
    assert entry.runtime["extraction"] == record["runtime"]["extraction"]
