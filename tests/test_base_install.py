"""The base install, alone in a fresh virtual environment (no system site-packages: nothing of this
environment leaks in), trains from a cache and reads, lists and verifies it; Ray, transformers, h5py,
matplotlib and the other extras are not importable there, and commands that need one say which extra
to install in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

from tests.conftest import make_sentiment_rows, write_config, write_csv
from unipt.pipeline import experiment
from unipt.pipeline.config import load_config

ROOT = Path(__file__).resolve().parent.parent
EXTRA_MODULES = {
    "ray": "extract",
    "transformers": "extract",
    "PIL": "extract",
    "h5py": "hdf5",
    "s3fs": "s3",
    "matplotlib": "plots",
    "datasets": "hf-datasets",
    "mlflow": "tracking",
}
pytestmark = [pytest.mark.install, pytest.mark.slow]  # builds a fresh venv: minutes


def _pip(python: Path, *args: str) -> None:
    command = [str(python), "-m", "pip", "--disable-pip-version-check", "--quiet", "install", "--no-compile"]
    out = subprocess.run([*command, *args], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.fixture(scope="module")
def base_env(tmp_path_factory) -> Path:
    """A fresh venv with torch (first, as setup.sh does: the CPU wheel) and then `pip install -c
    requirements-lock.txt unipt-cache` with no extra; returns its bin folder."""
    root = tmp_path_factory.mktemp("base_install")
    source = root / "src"  # a copy, so building the wheel leaves nothing in the checkout
    for name in ("pyproject.toml", "setup.py", "README.md", "requirements-lock.txt"):
        shutil.copy(ROOT / name, source / name if source.exists() else _mkdir(source) / name)
    for package in ("unipt", "pipeline", "extract", "train"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    _pip(python, f"torch=={torch.__version__.split('+')[0]}")
    _pip(python, "-c", str(source / "requirements-lock.txt"), str(source))
    return env_dir / "bin"


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_bert_dir, ray_session) -> tuple[Path, str]:
    """A committed cache, extracted here with the full install: (config, cache location)."""
    root = tmp_path_factory.mktemp("base_cache")
    data = write_csv(root / "reviews.csv", make_sentiment_rows(120))
    config = write_config(root / "c.yaml", str(data), str(tiny_bert_dir), root, train={"epochs": 2})
    prep = experiment.prepare(load_config(config))
    for result in experiment.extract_all(prep, progress=False).values():
        result.release()
    return config, str(prep.cache_root.location(prep.key))


def _run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    # cwd is never the checkout, so only the installed package can be imported.
    return subprocess.run(list(args), capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def test_the_base_install_has_no_extra(base_env, tmp_path):
    for module in EXTRA_MODULES:
        out = _run(base_env, "python", "-c", f"import {module}", cwd=tmp_path)
        assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, f"{module} is importable"
    code = "import unipt.pipeline, unipt.train; print(unipt.pipeline.__file__)"
    out = _run(base_env, "python", "-c", code, cwd=tmp_path)
    assert out.returncode == 0 and str(base_env.parent) in out.stdout  # the installed copy, not the checkout


def test_the_base_install_trains_from_a_cache_and_lists_reads_and_verifies_it(base_env, extracted, tmp_path):
    config, cache = extracted
    runs, registry = tmp_path / "runs", tmp_path / "registry.sqlite"
    out = _run(
        base_env, "unipt", "train", "--cache", cache, "--runs-root", str(runs), "--registry", str(registry),
        "--set", "train.epochs=2", "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert "plots skipped: matplotlib is not installed (pip install 'unipt-cache[plots]')" in out.stderr
    (run_dir,) = runs.iterdir()
    record = json.loads((run_dir / "record.json").read_text())
    assert record["metrics"]["test_acc"] is not None and len(record["history"]) == 2
    assert (run_dir / "model.safetensors").is_file() and not (run_dir / "curves.png").exists()
    assert record["versions"]["ray"] == "not installed"  # the record says what the run had

    assert _run(base_env, "unipt", "cache", "verify", cache, cwd=tmp_path).returncode == 0
    info = _run(base_env, "unipt", "cache", "info", cache, cwd=tmp_path)
    assert info.returncode == 0 and json.loads(info.stdout)["key"] == Path(cache).name
    listing = _run(base_env, "unipt", "cache", "ls", "--cache-root", str(Path(cache).parent), cwd=tmp_path)
    assert listing.returncode == 0 and Path(cache).name in listing.stdout
    assert _run(base_env, "unipt", "runs", "ls", "--registry", str(registry), cwd=tmp_path).returncode == 0


@pytest.mark.parametrize(
    "argv, extra",
    [
        (["extract", "{config}"], "extract"),
        (["cache", "export", "{cache}", "--format", "hdf5", "--out", "{tmp}/c.h5"], "hdf5"),
        (
            ["train", "--cache", "{cache}", "--set", "tracking.mlflow={tmp}/mlruns", "--no-progress"],
            "tracking",
        ),
        (
            ["train", "--cache", "{cache}", "--set", "tracking.tensorboard={tmp}/tb", "--no-progress"],
            "tracking",
        ),
    ],
)
def test_a_command_that_needs_an_extra_names_it_in_one_line(base_env, extracted, tmp_path, argv, extra):
    config, cache = extracted
    args = [a.format(config=config, cache=cache, tmp=tmp_path) for a in argv]
    if argv[0] == "train":  # cache commands and extract take no --runs-root
        args += ["--runs-root", str(tmp_path / "runs")]
    out = _run(base_env, "unipt", *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("unipt: error:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert lines[0].startswith("unipt: error: ") and f"pip install 'unipt-cache[{extra}]'" in lines[0]


def test_the_venv_is_really_separate():
    assert sys.prefix != sys.base_prefix  # the suite itself runs in setup.sh's venv, with every extra
