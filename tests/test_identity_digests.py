"""Backbone identity is cheap and exact: weights are hashed once per file version, a Hugging Face cache's
blob names are its digests, and a hub id is pinned to the commit its files came from."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from unipt.pipeline import experiment
from unipt.pipeline.cache import file_digests
from unipt.pipeline.cache.identity import backbone_identity
from unipt.pipeline.config import BackboneConfig
from unipt.pipeline.hashing import sha256_files


@pytest.fixture
def memo(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIPT_DIGEST_MEMO", str(tmp_path / "memo.json"))
    monkeypatch.setattr(file_digests, "_MEMORY", {})
    return tmp_path / "memo.json"


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """Every file the real sha256 reads, in order."""
    calls: list[Path] = []
    real = file_digests.sha256_file

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(file_digests, "sha256_file", counting)
    return calls


def test_weights_are_hashed_once_per_file_version(tiny_bert_dir, tmp_path, memo, hashed):
    model = shutil.copytree(tiny_bert_dir, tmp_path / "model")
    config = BackboneConfig(name_or_path=str(model))
    first = backbone_identity(config)
    assert [p.name for p in hashed] == ["model.safetensors"]
    assert first.weights_sha256 == sha256_files([model / "model.safetensors"])  # the same digest as before

    file_digests._MEMORY.clear()  # a new process: only the memo file remembers
    assert backbone_identity(config) == first and len(hashed) == 1

    # Rewrite one byte, keep size and mtime: ctime still moves, so the digest is recomputed.
    weights = model / "model.safetensors"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    changed = backbone_identity(config)
    assert len(hashed) == 2 and changed.weights_sha256 != first.weights_sha256
    assert changed.weights_sha256 == sha256_files([weights])


def test_a_damaged_memo_only_costs_a_rehash(tiny_bert_dir, memo, hashed):
    memo.write_text("{not json")
    identity = backbone_identity(BackboneConfig(name_or_path=str(tiny_bert_dir)))
    assert len(hashed) == 1 and json.loads(memo.read_text())  # rewritten whole
    assert identity.weights_sha256 == sha256_files([tiny_bert_dir / "model.safetensors"])


def _fake_hub_cache(root: Path, model: Path, repo: str, commit: str) -> None:
    """A Hugging Face cache as huggingface_hub lays it out: blobs named by content, a ref, a snapshot."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for source in model.iterdir():
        data = source.read_bytes()
        # LFS files (weights) are named by sha256, small git files by their git sha1 (40 hex).
        name = (
            hashlib.sha256(data).hexdigest()
            if source.suffix == ".safetensors"
            else hashlib.sha1(data).hexdigest()
        )
        (folder / "blobs" / name).write_bytes(data)
        (snapshot / source.name).symlink_to(Path("..") / ".." / "blobs" / name)


HUB_CHECK = """
import json
from unipt.pipeline import experiment
from unipt.pipeline.cache import file_digests
from unipt.pipeline.config import BackboneConfig
from unipt.pipeline.cache.identity import backbone_identity, cache_key_fields

read = []
real = file_digests.sha256_file
file_digests.sha256_file = lambda path: read.append(str(path)) or real(path)
settings = BackboneConfig(name_or_path="acme/tiny-bert")
identity = backbone_identity(settings)
spec = experiment.load_spec(experiment.PreparedBackbone("main", settings, identity, {}, ""), "none")
print(json.dumps({"identity": identity.key_fields(), "read": read, "spec_revision": spec.revision,
                  "spec_name": spec.name_or_path}))
"""


def test_a_hub_id_is_pinned_to_its_commit_and_its_blob_names_are_the_digests(tiny_bert_dir, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path / "hub", tiny_bert_dir, "acme/tiny-bert", commit)
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "UNIPT_DIGEST_MEMO": str(tmp_path / "memo.json"),
    }
    result = subprocess.run(
        [sys.executable, "-c", HUB_CHECK], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["identity"]["revision"] == commit  # "main" resolved on the driver
    assert found["identity"]["weights_sha256"] == sha256_files([tiny_bert_dir / "model.safetensors"])
    assert not [p for p in found["read"] if p.endswith(".safetensors")]  # the weights were never read
    # Workers load the hub id at exactly that commit, not whatever "main" is when they start.
    assert (found["spec_name"], found["spec_revision"]) == ("acme/tiny-bert", commit)


def test_local_folders_keep_their_configured_revision(tiny_bert_dir, memo):
    settings = BackboneConfig(name_or_path=str(tiny_bert_dir))
    identity = backbone_identity(settings)
    assert identity.revision is None
    spec = experiment.load_spec(experiment.PreparedBackbone("main", settings, identity, {}, ""), "none")
    assert spec.name_or_path == str(tiny_bert_dir) and spec.revision is None
