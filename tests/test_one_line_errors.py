"""Every bad input of issue 19 is one `unipt: error:` line, exit 2, nothing left behind; secrets never reach
disk; texts the tokenizer cannot see get one warning."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.conftest import make_sentiment_rows, write_config, write_csv
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cli.app import main
from unipt.pipeline.config import ExperimentConfig
from unipt.pipeline.errors import UniptError
from unipt.pipeline.storage import Location, check_no_secrets


def _error_line(capsys: pytest.CaptureFixture, *argv: str) -> str:
    code = main([*argv])
    out, err = capsys.readouterr()
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("unipt: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err and "Traceback" not in out, err
    return errors[0]


def _nothing_left(root: Path) -> None:
    caches = CacheRoot(root / "cache")
    assert caches.keys() == [] and caches.partial_keys() == []
    assert not list(root.glob("runs/*/record.json")) and not (root / "registry.sqlite").exists()


@pytest.mark.parametrize("value", ["train.epochs=[1", "train.lr=@x", "train.lr=`x", "backbone.layers={0: [1"])
def test_a_malformed_set_value(tmp_path, tiny_config, capsys, value):
    line = _error_line(capsys, "run", str(tiny_config), "--set", value, "--no-progress")
    key = value.partition("=")[0]
    assert f"--set {key}: value {value.partition('=')[2]!r} is not valid YAML" in line
    assert "quoting text that starts with a symbol" in line
    _nothing_left(tmp_path)


def test_an_unknown_method_names_the_registered_ones(tmp_path, tiny_config, capsys):
    line = _error_line(capsys, "run", str(tiny_config), "--set", "train.method=adapter", "--no-progress")
    assert "train.method: Value error, unknown method 'adapter'; choose one of unipt, lst, scalar_mix" in line
    _nothing_left(tmp_path)


@pytest.mark.parametrize("grid", ["train.epochs=[1,2", "train.lr=@x,1e-3"])
def test_a_malformed_grid_value(tmp_path, tiny_config, capsys, grid):
    line = _error_line(capsys, "sweep", str(tiny_config), "--grid", grid, "--no-progress")
    assert f"--grid {grid.partition('=')[0]}: value" in line and "is not valid YAML" in line
    _nothing_left(tmp_path)


def test_a_directory_as_the_source(tmp_path, tiny_bert_dir, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    write_csv(folder / "reviews.csv", make_sentiment_rows(20))
    config = write_config(tmp_path / "c.yaml", str(folder), str(tiny_bert_dir), tmp_path)
    line = _error_line(capsys, "run", str(config), "--no-progress")
    assert f"dataset.source {folder} is a directory (it holds reviews.csv)" in line
    assert "set it to one .csv/.tsv/.jsonl/.parquet file" in line
    _nothing_left(tmp_path)


def test_a_tab_indented_config(tmp_path, tiny_config, capsys):
    text = tiny_config.read_text().replace("  epochs: 12", "\tepochs: 12")
    config = tmp_path / "tabs.yaml"
    config.write_text(text)
    line_no = text.splitlines().index("\tepochs: 12") + 1
    line = _error_line(capsys, "run", str(config), "--no-progress")
    assert line == (
        f"unipt: error: config {config} line {line_no}, column 1: YAML does not allow tabs for indentation; "
        "indent with spaces"
    )
    assert "\t" not in line and "<unicode string>" not in line
    _nothing_left(tmp_path)


def test_other_broken_yaml_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("name: x\ndataset:\n  source: a.csv\n   extra: [1\n")
    line = _error_line(capsys, "run", str(config), "--no-progress")
    assert f"config {config} line 4, column" in line and "not valid YAML" in line
    assert "<unicode string>" not in line


def test_duplicate_ids_say_how_to_fix_them(tmp_path, tiny_bert_dir, capsys):
    rows = make_sentiment_rows(30)
    rows[9]["id"] = rows[4]["id"]
    data = write_csv(tmp_path / "d.csv", rows)
    config = write_config(tmp_path / "c.yaml", str(data), str(tiny_bert_dir), tmp_path)
    line = _error_line(capsys, "run", str(config), "--no-progress")
    assert "id 'r0004' appears more than once in column 'id' (1 repeated ids)" in line
    assert "fix that column, or set dataset.id_column: null to derive ids from each example's content" in line
    _nothing_left(tmp_path)


@pytest.mark.slow
def test_texts_with_no_content_for_the_tokenizer_get_one_warning(
    ray_session, tmp_path, tiny_bert_dir, capsys
):
    rows = make_sentiment_rows(40)
    rows[3]["text"] = "\U0001f642\U0001f642\U0001f642"  # emoji only: [CLS] [UNK] [SEP]
    rows[20]["text"] = "\u200b\u200b"  # zero-width spaces: not whitespace to str.strip, nothing to BERT
    data = write_csv(tmp_path / "d.csv", rows)
    config = write_config(
        tmp_path / "c.yaml", str(data), str(tiny_bert_dir), tmp_path, extract={"shard_size": 8}
    )
    assert main(["extract", str(config), "--no-progress"]) == 0
    _, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if "special or unknown tokens" in line]
    assert len(warnings) == 1, err
    assert warnings[0].startswith(
        "unipt: warning: 2 text(s) tokenize to nothing but special or unknown tokens"
    )
    assert "'r0003'" in warnings[0] and "'r0020'" in warnings[0]


# --- 6. secrets ---------------------------------------------------------------------------------------------

SECRET_OPTIONS = [
    {"client_kwargs": {"aws_session_token": "s3cr3t-value"}},
    {"s3_additional_kwargs": {"SSECustomerKey": "s3cr3t-value"}},
    {"account_key": "s3cr3t-value"},
    {"sas_token": "s3cr3t-value"},
    {"connection_string": "s3cr3t-value"},
    {"client_kwargs": {"client_secret": "s3cr3t-value"}},
    {"config_kwargs": {"api_key": "s3cr3t-value"}},
    {"token": "s3cr3t-value"},
    {"client_kwargs": {"endpoint_url": "https://user:s3cr3t-value@minio.local:9000"}},
    {"headers": [{"Authorization-Token": "s3cr3t-value"}]},
]


@pytest.mark.parametrize("options", SECRET_OPTIONS)
def test_secret_options_at_any_depth_are_refused_and_never_written(tmp_path, tiny_config, capsys, options):
    import yaml

    raw = yaml.safe_load(tiny_config.read_text())
    raw["storage"]["options"] = options
    tiny_config.write_text(yaml.safe_dump(raw))
    line = _error_line(capsys, "run", str(tiny_config), "--no-progress")
    assert "credential" in line and "s3cr3t-value" not in line
    assert "environment" in line
    _nothing_left(tmp_path)
    with pytest.raises(UniptError):
        check_no_secrets(options)


def test_harmless_options_pass():
    check_no_secrets(
        {
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
            "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "arn:aws:kms:..."},
            "anon": False,
            "default_block_size": 1 << 20,
        }
    )


def test_a_password_in_the_cache_root_url_is_refused(capsys):
    with pytest.raises(UniptError, match="storage.cache_root carries a user:password@") as info:
        ExperimentConfig.model_validate(
            {
                "name": "x",
                "dataset": {"source": "a.csv"},
                "backbone": {"name_or_path": "m"},
                "storage": {"cache_root": "s3://AKIAEXAMPLE:s3cr3t-value@bucket/caches"},
            }
        )
    assert "s3cr3t-value" not in str(info.value)
    line = _error_line(capsys, "cache", "ls", "--cache-root", "s3://me:s3cr3t-value@bucket/caches")
    assert "carries a user:password@" in line and "s3cr3t-value" not in line
    with pytest.raises(UniptError):
        Location("https://me:pw@host/x")


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """An environment with no AWS credentials anywhere, and an endpoint nobody listens on (no network)."""
    pytest.importorskip("s3fs")
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))


def test_missing_s3_credentials_are_one_line(no_aws_credentials, capsys):
    line = _error_line(capsys, "cache", "ls", "--cache-root", "s3://some-bucket/caches")
    assert "NoCredentialsError" in line and "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line


def test_an_unknown_fsspec_option_is_one_line(no_aws_credentials, tmp_path, tiny_config, capsys):
    import yaml

    raw = yaml.safe_load(tiny_config.read_text())
    raw["storage"].update(cache_root="s3://some-bucket/caches", options={"no_such_option": 1})
    tiny_config.write_text(yaml.safe_dump(raw))
    line = _error_line(capsys, "extract", str(tiny_config), "--no-progress")
    assert "storage.options: the object store's client refused them" in line and "no_such_option" in line


def test_a_chunk_path_that_is_a_directory_is_damage_not_a_traceback(tmp_path: Path, capsys):
    from tests.conftest import KEY, build_cache
    from unipt.pipeline.cache.opener import open_cache

    root = CacheRoot(tmp_path / "cache")
    build_cache(root, [3, 5, 2, 4, 6, 1, 2], {0: 4, 1: 4}, shard_size=2)
    store = Path(str(root.location(KEY)))
    chunk = store / "layer_00" / "c" / "0" / "0"
    chunk.unlink()
    chunk.mkdir()  # a directory where the chunk file was written
    assert main(["cache", "verify", str(store), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED layer_00 chunk 0 (rows 0-7): cannot be read as a file (Is a directory)" in out
    with open_cache(store) as reader, pytest.raises(UniptError, match="layer_00 rows 0-3 could not be read"):
        reader.read_rows(0, 0, 3)
