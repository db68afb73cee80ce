"""Security: pickles only by opt-in and never with code, no remote code unless configured, no path
escapes from the cache root, and credentials that stay in the environment."""

from __future__ import annotations

import ast
import functools
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import KEY, build_cache, make_sentiment_rows, write_config, write_csv
from unipt.pipeline import experiment
from unipt.pipeline.cache.layout import LayerSpec, StoreLayout
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cache.writer import CacheBuilder, write_shard
from unipt.pipeline.cli.app import main
from unipt.pipeline.config import BackboneConfig, load_config
from unipt.pipeline.errors import UniptError
from unipt.pipeline.storage import Location

PROJECT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", ".git", "node_modules", "build", "dist", ".unipt"}


def _project_files() -> list[Path]:
    """The project's own Python files: its packages, benchmarks and tests (never an installed
    environment, whatever it is called: .venv, .venv312, ...)."""
    return [
        path
        for top in ("pipeline", "extract", "train", "benchmarks", "tests")
        for path in (PROJECT / top).rglob("*.py")
        if not SKIP_DIRS.intersection(path.relative_to(PROJECT).parts[:-1])
    ]


@functools.cache
def _calls(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(node, ast.Call)]


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


# --- pickles -------------------------------------------------------------------------------------------


def test_every_torch_load_passes_weights_only_true():
    loads, bad = 0, []
    for path in _project_files():
        for call in _calls(path):
            func = call.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "load"
                and getattr(func.value, "id", "") == "torch"
            ):
                loads += 1
                flag = _keyword(call, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    bad.append(f"{path.relative_to(PROJECT)}:{call.lineno}")
            if (
                isinstance(func, ast.Attribute)
                and func.attr in ("load", "loads")
                and getattr(func.value, "id", "")
                in (
                    "pickle",
                    "cloudpickle",
                    "dill",
                )
            ):
                bad.append(f"{path.relative_to(PROJECT)}:{call.lineno} ({func.value.id}.{func.attr})")
    assert loads >= 3  # checkpoints, the bundled CNN, tests: the scan does see them
    assert bad == [], f"unpickling without weights_only=True: {bad}"


def test_every_from_pretrained_model_load_is_weights_only():
    """Hugging Face model loads: weights_only=True, and safetensors only unless allow_pickle."""
    seen = []
    for path in _project_files():
        if path.parts[-2] == "tests" or path.parts[-2] == "benchmarks":
            continue
        for call in _calls(path):
            func = call.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "from_pretrained"
                and _keyword(call, "use_safetensors")
            ):
                seen.append(path.relative_to(PROJECT).as_posix())
                flag = _keyword(call, "weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, f"{path}:{call.lineno}"
                assert "allow_pickle" in ast.unparse(_keyword(call, "use_safetensors")), (
                    f"{path}:{call.lineno}"
                )
    assert "extract/backbones/base.py" in seen


def _pickled_bert(tiny_bert_dir: Path, folder: Path) -> Path:
    """The tiny BERT as a user might download an old checkpoint: config + pytorch_model.bin only."""
    import torch
    from safetensors.torch import load_file

    folder.mkdir()
    torch.save(load_file(tiny_bert_dir / "model.safetensors"), folder / "pytorch_model.bin")
    for name in ("config.json",):
        shutil.copy(tiny_bert_dir / name, folder / name)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_bert_dir / name, folder / name)
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    return folder


def test_pickled_weights_are_refused_unless_allow_pickle(tmp_path, tiny_bert_dir, capsys):
    from unipt.extract.backbones import HFTextBackbone
    from unipt.extract.spec import BackboneLoadSpec

    assert BackboneConfig(name_or_path="x").allow_pickle is False
    pickled = _pickled_bert(tiny_bert_dir, tmp_path / "old-bert")
    data = write_csv(tmp_path / "data.csv", make_sentiment_rows(30))
    config = write_config(tmp_path / "c.yaml", str(data), str(pickled), tmp_path)
    assert main(["extract", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("unipt: error:") == 1 and "only pickled weights (pytorch_model.bin)" in err
    assert "set backbone.allow_pickle: true" in err
    assert CacheRoot(tmp_path / "cache").keys() == [] and CacheRoot(tmp_path / "cache").partial_keys() == []

    # Opted in: the .bin is hashed into the cache key and loads (through torch.load(weights_only=True)).
    prep = experiment.prepare(load_config(config, ["backbone.allow_pickle=true"]))
    assert len(prep.key) == 32
    texts = ["a great film", "dull"]
    opted = HFTextBackbone(BackboneLoadSpec(str(pickled), allow_pickle=True, device="cpu"))
    safe = HFTextBackbone(BackboneLoadSpec(str(tiny_bert_dir), device="cpu"))
    got, want = opted.encode(texts, [0, 2], 16, 2, "float32"), safe.encode(texts, [0, 2], 16, 2, "float32")
    np.testing.assert_array_equal(got.layers[2], want.layers[2])
    with pytest.raises(Exception, match="safetensors|model.safetensors|no file named"):
        HFTextBackbone(BackboneLoadSpec(str(pickled), device="cpu"))  # the worker refuses without opt-in too


class _RunsCode:
    """Unpickling this runs a shell command: what a hostile pytorch_model.bin would hold."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.sentinel}",))


def test_even_with_allow_pickle_a_pickle_cannot_run_code(tmp_path, tiny_bert_dir):
    import torch

    from unipt.extract.backbones import HFTextBackbone
    from unipt.extract.spec import BackboneLoadSpec

    hostile = _pickled_bert(tiny_bert_dir, tmp_path / "hostile-bert")
    sentinel = tmp_path / "pwned"
    state = torch.load(hostile / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "payload": _RunsCode(sentinel)}, hostile / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global|unpickl"):
        HFTextBackbone(BackboneLoadSpec(str(hostile), allow_pickle=True, device="cpu"))
    assert not sentinel.exists()


# --- remote code ---------------------------------------------------------------------------------------


def test_trust_remote_code_is_off_unless_configured(tmp_path):
    from unipt.extract.backbones import load_backbone
    from unipt.extract.spec import BackboneLoadSpec

    assert BackboneConfig(name_or_path="x").trust_remote_code is False
    assert BackboneLoadSpec("x").trust_remote_code is False
    # A model folder whose config asks for its own Python code, which would leave a mark if it ran.
    folder = tmp_path / "custom-model"
    folder.mkdir()
    sentinel = tmp_path / "custom-code-ran"
    (folder / "modeling_evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    (folder / "configuration_evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "auto_map": {
                    "AutoConfig": "configuration_evil.EvilConfig",
                    "AutoModel": "modeling_evil.EvilModel",
                },
            }
        )
    )
    # transformers refuses (trust_remote_code=False is passed explicitly); unipt says so in one line.
    with pytest.raises(UniptError, match="ships its own Python code.*backbone.trust_remote_code: true"):
        load_backbone(BackboneLoadSpec(str(folder), device="cpu"))
    assert not sentinel.exists()


def test_trust_remote_code_reaches_transformers_only_from_the_config():
    """Every `trust_remote_code=` in the project passes a config/spec field through, never a literal."""
    passed = []
    for path in _project_files():
        if path.parts[-2] == "tests":
            continue
        for call in _calls(path):
            value = _keyword(call, "trust_remote_code")
            if value is None:
                continue
            passed.append(f"{path.name}:{call.lineno}")
            # A config field (spec.trust_remote_code) or the command line's flag passed through: never a
            # literal, and never a value read from a file (model.json's backbone["trust_remote_code"]).
            from_field = isinstance(value, ast.Attribute) and value.attr == "trust_remote_code"
            passed_on = isinstance(value, ast.Name) and value.id == "trust_remote_code"
            assert from_field or passed_on, f"{path}:{call.lineno} passes {ast.unparse(value)}"
    assert len(passed) >= 4  # AutoConfig, AutoModel, AutoTokenizer, AutoImageProcessor


# --- paths ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../x", "..", "a/b", "/etc", "ABCDEF", "", "a" * 65, "00/../../x"])
def test_cache_keys_cannot_leave_the_cache_root(tmp_path, key):
    root = CacheRoot(tmp_path / "cache")
    for where in (root.location, root.partial_location, root.lock_location, root.lease_location):
        with pytest.raises(UniptError, match="not a hex digest"):
            where(key)
    with pytest.raises(UniptError, match="not a hex digest"):
        CacheBuilder(root, key)


@pytest.mark.parametrize("part", ["..", "../etc", "a/../../b", ".", "", "a\\..\\b"])
def test_path_parts_cannot_climb_out(tmp_path, part):
    with pytest.raises(UniptError, match="would leave"):
        Location(tmp_path).child(part)
    with pytest.raises(UniptError, match="would leave"):
        Location("s3://bucket/caches").child(part)


def test_backbone_names_cannot_be_paths(tmp_path, tiny_bert_dir, sentiment_csv, capsys):
    config = write_config(tmp_path / "c.yaml", str(sentiment_csv), str(tiny_bert_dir), tmp_path)
    import yaml

    raw = yaml.safe_load(config.read_text())
    raw["backbones"] = {"../../evil": raw.pop("backbone")}  # a name that would become a directory
    config.write_text(yaml.safe_dump(raw))
    assert main(["extract", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "backbone names ['../../evil'] must be letters, digits" in err and err.count("\n") == 1


def test_a_hostile_checksums_file_cannot_make_verify_read_outside_the_store(tmp_path, capsys):
    root = CacheRoot(tmp_path / "cache")
    build_cache(root, [3, 4, 5], {0: 4})
    (key,) = root.keys()
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    checksums = tmp_path / "cache" / key / "checksums.json"
    record = json.loads(checksums.read_text())
    record["files"]["../../secret.txt"] = "0" * 64
    checksums.write_text(json.dumps(record))
    assert main(["cache", "verify", key, "--cache-root", str(tmp_path / "cache"), "--no-progress"]) == 2
    _, err = capsys.readouterr()
    assert "unipt: error: path part '..' would leave" in err and "Traceback" not in err


def _tree(path: Path) -> dict[str, bytes]:
    """Every file below ``path`` (or ``path`` itself) and its bytes: what must survive a gc untouched."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_gc_never_follows_a_symlink_out_of_the_cache_root(tmp_path, capsys):
    """Hex-named links where gc looks (a view, a segment, a space, an unfinished store, a lease file),
    each pointing outside the root: gc skips each with a warning, removes nothing through them, and
    still collects the real garbage beside them."""
    caches, outside = tmp_path / "cache", CacheRoot(tmp_path / "outside")
    root = CacheRoot(caches)
    build_cache(root, [3, 4, 5], {0: 4})  # real, unreferenced: gc removes it
    view, segment, space, partial = "a1" * 16, "b2" * 16, "c3" * 16, "d4" * 16
    for key in (view, segment):
        build_cache(outside, [3, 4, 5], {0: 4}, key=key)  # committed stores, so gc lists the links
    build_cache(outside, [3, 4], {0: 4}, key=partial, commit=False)
    victim_file = tmp_path / "outside" / "precious.txt"
    victim_file.write_text("not unipt's")
    (tmp_path / "outside" / "space").mkdir()
    (tmp_path / "outside" / "space" / "data.bin").write_bytes(b"\x01" * 64)
    links = {
        caches / view: tmp_path / "outside" / view,
        caches / "spaces" / ("e5" * 16) / "segments" / segment: tmp_path / "outside" / segment,
        caches / "spaces" / space: tmp_path / "outside" / "space",
        caches / ".partial" / partial: tmp_path / "outside" / ".partial" / partial,
        caches / ".leases" / f"{'f6' * 16}.lock": victim_file,
    }
    before = {target: _tree(target) for target in links.values()}
    for link, target in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)

    args = ["cache", "gc", "--cache-root", str(caches), "--no-registry", "--include-partial", "--yes"]
    assert main([*args, "--runs-root", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert f"removing {KEY}" in out and KEY not in root.keys()
    for link, target in links.items():
        assert link.is_symlink(), f"gc removed the link {link}"
        assert _tree(target) == before[target], f"gc changed {target} through {link}"
        assert f"{link} is a symbolic link" in out
    assert not (caches / ".trash").exists() or not any((caches / ".trash").iterdir())


@pytest.mark.parametrize("folder", [".trash", ".partial", ".leases", "spaces"])
def test_gc_refuses_a_cache_root_whose_own_folder_is_a_link(tmp_path, capsys, folder):
    caches, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    build_cache(CacheRoot(caches), [3, 4, 5], {0: 4})
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    shutil.rmtree(caches / folder, ignore_errors=True)
    (caches / folder).symlink_to(elsewhere)
    args = ["cache", "gc", "--cache-root", str(caches), "--no-registry", "--include-partial", "--yes"]
    assert main([*args, "--runs-root", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{caches / folder} is a symbolic link" in err
    assert CacheRoot(caches).keys() == [KEY] and sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]


def test_a_lock_file_that_is_a_link_is_never_followed(tmp_path):
    from unipt.pipeline.cache.locks import exclusive

    victim = tmp_path / "victim.txt"
    victim.write_text("data")
    lock = CacheRoot(tmp_path / "cache").lock_location(KEY)
    Path(lock.url).parent.mkdir(parents=True)
    Path(lock.url).symlink_to(victim)
    with pytest.raises(UniptError, match="is a symbolic link"), exclusive(lock):
        pass
    assert victim.read_text() == "data" and Path(lock.url).is_symlink()


def test_children_of_a_location_are_never_resolved_through_links(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "target")
    root = Location(tmp_path / "root")
    child = root.child("link")
    assert child.url == str(tmp_path / "root" / "link") and child.symlink_below(root) == child.url
    child.remove()  # the link goes, its target stays
    assert not (tmp_path / "root" / "link").exists() and (tmp_path / "target").is_dir()


# --- credentials ---------------------------------------------------------------------------------------

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAUNIPTTESTKEY0001",
    "AWS_SECRET_ACCESS_KEY": "uniptTestSecret/Value+0123456789abcdef",
    "AWS_SESSION_TOKEN": "uniptTestSessionToken0123456789",
}


def _cache_for(config: Path) -> None:
    """A committed cache under the config's key (random activations): training reads it like any other."""
    prep = experiment.prepare(load_config(config))
    table = prep.dataset.table
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(2, 8, size=table.num_rows)]
    layout = StoreLayout(layers=(LayerSpec(0, 8), LayerSpec(1, 8)), num_examples=table.num_rows, max_length=8)
    builder = CacheBuilder(prep.cache_root, prep.key)
    builder.create(layout, {"key_fields": prep.key_fields, "label_names": prep.dataset.label_names})
    for shard in layout.shards():
        part = lengths[shard.example_start : shard.example_stop]
        rows = {layer: rng.standard_normal((sum(part), 8)).astype(np.float16) for layer in (0, 1)}
        write_shard(builder.location, layout, shard, rows, part)
    builder.commit(layout, table.select(["example_id", "label", "split"]), {})


def test_credentials_come_from_the_environment_and_are_never_recorded(
    tmp_path, tiny_bert_dir, sentiment_csv, monkeypatch, capsys
):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    options = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "us-east-1"}}
    config = write_config(
        tmp_path / "c.yaml",
        str(sentiment_csv),
        str(tiny_bert_dir),
        tmp_path,
        train={"epochs": 1, "probe_baseline": False},
        storage={"options": options},
    )
    _cache_for(config)
    assert main(["run", str(config), "--no-progress"]) == 0
    capsys.readouterr()
    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    written += [p for p in tmp_path.glob("registry.sqlite*") if p.is_file()]
    assert any(p.name == "record.json" for p in written) and any(p.suffix == ".sqlite" for p in written)
    for path in written:
        data = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{name} leaked into {path}"
    with sqlite3.connect(tmp_path / "registry.sqlite") as db:
        dump = "\n".join(db.iterdump())
    assert not any(value in dump for value in SECRETS.values())
    record = json.loads(next(p for p in written if p.name == "record.json").read_text())
    assert record["config"]["storage"]["options"] == options  # the non-secret options are kept


@pytest.mark.parametrize(
    "option", ["key", "secret", "token", "aws_secret_access_key", "client_kwargs.password"]
)
def test_credentials_in_a_config_are_refused(tmp_path, tiny_bert_dir, sentiment_csv, capsys, option):
    config = write_config(tmp_path / "c.yaml", str(sentiment_csv), str(tiny_bert_dir), tmp_path)
    assert main(["run", str(config), "--no-progress", "--set", f"storage.options.{option}=hunter2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "looks like a credential; put it in the environment" in err
    assert "hunter2" not in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "registry.sqlite").exists()


# --- hostile model folders (predict / evaluate) ----------------------------------------------------------


def _model_folder(folder: Path) -> Path:
    """A real tuned-model folder (model.json + model.safetensors) of the shape the tiny BERT gives, written
    as training writes it; no backbone is needed to load it."""
    from unipt.pipeline.config import TrainConfig
    from unipt.pipeline.model.files import ModelSpec, write_model
    from unipt.pipeline.model.predict import _Shape
    from unipt.train.methods import build_model

    spec = ModelSpec(
        task="classification", variant="transformer", num_outputs=2, label_names=["neg", "pos"],
        layers=[0, 1, 2], hidden_sizes={"0": 32, "1": 32, "2": 32}, grids={}, embed_size=None,
        downsample_factor=2, dropout=0.1, input="text", dtype="float16", max_length=32, preprocessing={},
        backbone={"name_or_path": str(folder / "no-backbone")}, autocast="none", batch_size=8,
        cache_key="", dataset_fingerprint="",
    )  # fmt: skip
    config = TrainConfig(variant="transformer", downsample_factor=2, dropout=0.1)
    network = build_model(_Shape(spec, str(folder)), config, num_outputs=2)
    write_model(folder, network.state_dict(), spec)
    return folder


def _edit_card(folder: Path, **changes) -> None:
    card = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**card, **changes}))


def _weights_header(folder: Path, length: int, body: bytes = b"{}") -> None:
    (folder / "model.safetensors").write_bytes(length.to_bytes(8, "little") + body)


HOSTILE_MODEL_FOLDERS = {
    "model.json is a list": (lambda f: (f / "model.json").write_text("[1, 2]"), "holds a list"),
    "safetensors header of 2^62": (lambda f: _weights_header(f, 2**62), "not a readable safetensors"),
    "safetensors header of ~90 MB": (
        lambda f: _weights_header(f, 90_000_000, b"{" + b" " * 90_000_000),
        "not a readable safetensors",
    ),
    "weights not safetensors": (
        lambda f: (f / "model.safetensors").write_bytes(b"PK\x03\x04 a zip, not safetensors"),
        "not a readable safetensors",
    ),
    "embed_size 2^20": (lambda f: _edit_card(f, embed_size=2**20), "embed_size is 1048576"),
    "hidden size 2^31": (
        lambda f: _edit_card(f, hidden_sizes={"0": 2**31, "1": 32, "2": 32}),
        "hidden size is 2147483648",
    ),
    # Within the limits, but not what the weights hold: refused before the network is allocated.
    "embed_size 4096, weights of 32": (
        lambda f: _edit_card(f, embed_size=4096),
        "model.json makes it [2, 4096]",
    ),
    "label_names longer than the outputs": (
        lambda f: _edit_card(f, label_names=["neg", "pos", "meh"]),
        "3 label_names for 2 outputs",
    ),
    "num_outputs -5": (lambda f: _edit_card(f, num_outputs=-5), "num_outputs is -5"),
    "batch_size 0": (lambda f: _edit_card(f, batch_size=0), "batch_size: Input should be greater than 0"),
    "NaN dropout": (
        lambda f: (f / "model.json").write_text(
            (f / "model.json").read_text().replace('"dropout": 0.1', '"dropout": NaN')
        ),
        "dropout",
    ),
    'variant "os.system"': (lambda f: _edit_card(f, variant="os.system"), "variant: Input should be"),
    "backbone.trust_remote_code: true": (
        lambda f: _edit_card(f, backbone={"name_or_path": "anything", "trust_remote_code": True}),
        "pass --trust-remote-code",
    ),
}


@pytest.fixture(scope="module")
def good_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model_folder(tmp_path_factory.mktemp("model") / "good")


def test_the_untouched_model_folder_loads(good_model):
    from unipt.pipeline.model.predict import load_model

    model = load_model(good_model, device="cpu")  # the hostile cases below differ from it by one edit
    assert model.spec.label_names == ["neg", "pos"] and model.trust_remote_code is False


@pytest.mark.parametrize("case", list(HOSTILE_MODEL_FOLDERS))
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_hostile_model_folder_is_one_line(case, command, good_model, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(good_model, folder)
    damage, expected = HOSTILE_MODEL_FOLDERS[case]
    damage(folder)
    data = write_csv(tmp_path / "in.csv", make_sentiment_rows(4))
    before = sorted(p.name for p in folder.iterdir())
    code = main([command, str(folder), "--input", str(data), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("unipt: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written beside it


def test_predict_runs_no_code_a_model_folder_names(good_model, tmp_path, capsys):
    """model.json asks for remote code and points at a folder whose config.json maps to a .py file: the
    code never runs, with or without the backbone's files, and the refusal names the flag."""
    folder = tmp_path / "model"
    shutil.copytree(good_model, folder)
    backbone = tmp_path / "custom-backbone"
    backbone.mkdir()
    sentinel = tmp_path / "custom-code-ran"
    (backbone / "configuration_evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    (backbone / "config.json").write_text(
        json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}})
    )
    _edit_card(folder, backbone={"name_or_path": str(backbone), "trust_remote_code": True})
    assert main(["predict", str(folder), "--text", "a fine film", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("unipt: error:") == 1 and "--trust-remote-code" in err and "Traceback" not in err
    assert not sentinel.exists()


def test_a_known_backbone_with_an_auto_map_loads_without_running_its_code(tmp_path, tiny_bert_dir):
    """A BERT folder whose config.json also maps to .py files (a downloaded folder naming remote code):
    transformers' own class loads it, and the files never run (trust_remote_code=False is explicit)."""
    from unipt.extract.backbones import load_backbone
    from unipt.extract.spec import BackboneLoadSpec

    folder = tmp_path / "bert-with-code"
    shutil.copytree(tiny_bert_dir, folder)
    sentinel = tmp_path / "custom-code-ran"
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModel": "modeling_evil.EvilModel",
        "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None],
    }
    (folder / "config.json").write_text(json.dumps(config))
    backbone = load_backbone(BackboneLoadSpec(str(folder), device="cpu"))
    assert type(backbone.model).__name__ == "BertModel"
    assert backbone.encode(["a fine film"], [0, 2], 16, 1, "float32").layers[2].shape[1] == 32
    assert not sentinel.exists()
