"""Caches on an object store: a real S3 API (moto's server) on loopback, credentials from the environment."""

from __future__ import annotations

import json
import logging
import os
import socket

import numpy as np
import pytest

from tests.conftest import KEY, build_cache, run_cli
from unipt.pipeline.cache.admin import verify
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.errors import UniptError
from unipt.pipeline.storage import Location

SECRET = "s3cr3t-never-in-a-record"


@pytest.fixture(scope="module")
def s3_endpoint():
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "unipt-test",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # the way users pass credentials; Ray workers inherit them
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("unipt-test")
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_store_round_trip_verify_and_gc_on_s3(s3_endpoint, tmp_path):
    root = CacheRoot("s3://unipt-test/unit")
    lengths = [5, 1, 9, 3, 7, 2]
    tokens, _ = build_cache(root, lengths, {0: 4, 1: 6}, chunks_per_file=2, dtype="bfloat16")
    assert root.keys() == [KEY] and root.partial_keys() == []  # committed in place: no .partial on S3
    reader = open_cache(root.location(KEY))
    for i in range(len(lengths)):
        np.testing.assert_allclose(reader.read_example(i, 1), tokens[1][i].astype(np.float32), rtol=8e-3)
    assert verify(reader) == []

    damaged = root.location(KEY).child("layer_01", "c", "0", "0")
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0x10
    damaged.write_bytes(bytes(data))
    problems = verify(open_cache(root.location(KEY)))
    assert [p.what for p in problems] == ["layer_01 chunk 0 (rows 0-15)"]

    unfinished = "cd" * 16
    build_cache(root, lengths, {0: 4}, key=unfinished, commit=False)
    assert root.keys() == [KEY] and root.partial_keys() == [unfinished]
    with pytest.raises(UniptError, match="incomplete"):
        open_cache(root.location(unfinished))


def test_credentials_in_storage_options_are_refused():
    with pytest.raises(UniptError, match="looks like a credential; put it in the environment"):
        Location("s3://bucket/x", {"client_kwargs": {"aws_secret_access_key": "x"}})


def _run(config, cache_root: str, runs_root) -> object:
    return run_cli(
        "run", str(config), "--no-progress", "--set", "train.epochs=3",
        "--cache-root", cache_root, "--runs-root", str(runs_root),
    )  # fmt: skip


@pytest.mark.e2e
def test_extract_to_s3_then_stream_train_from_it(s3_endpoint, tiny_config, tmp_path):
    """`unipt run` with an s3:// cache root: Ray workers write to S3 and training streams from it."""
    remote = _run(tiny_config, "s3://unipt-test/caches", tmp_path / "runs-s3")
    assert "cache miss" in remote.stderr
    _run(tiny_config, str(tmp_path / "local-cache"), tmp_path / "runs-local")
    record_text = next((tmp_path / "runs-s3").glob("*/record.json")).read_text()
    assert SECRET not in record_text and "unipt-test" in record_text
    s3_record = json.loads(record_text)
    local_record = json.loads(next((tmp_path / "runs-local").glob("*/record.json")).read_text())
    assert s3_record["cache"]["key"] == local_record["cache"]["key"]
    assert s3_record["cache"]["path"].startswith("s3://unipt-test/caches/")
    for name in ("test_acc", "val_acc", "probe_test_acc"):
        assert s3_record["metrics"][name] == local_record["metrics"][name], name

    again = _run(tiny_config, "s3://unipt-test/caches", tmp_path / "runs-s3")
    assert "cache hit" in again.stderr
    verified = run_cli("cache", "verify", s3_record["cache"]["path"], "--no-progress")
    assert verified.stdout.startswith("ok:")
    listed = run_cli("cache", "ls", "--cache-root", "s3://unipt-test/caches")
    assert listed.stdout.splitlines()[1].startswith(s3_record["cache"]["key"])  # under the header
