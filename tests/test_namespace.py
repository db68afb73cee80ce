"""One import namespace: the stages install as ``unipt.pipeline``, ``unipt.extract`` and ``unipt.train``, so a
user's own ``train.py``, ``pipeline.py`` and ``extract.py`` beside their script shadow nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_readme_api import python_api_example

ROOT = Path(__file__).resolve().parents[1]
# What a user's files of those names could hold; importing one of them instead of unipt's is a failure.
SHADOWS = {
    name: f"raise ImportError('the user\\'s own {name}.py was imported')\n"
    for name in ("train", "pipeline", "extract")
}


def _user_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, code in SHADOWS.items():
        (folder / f"{name}.py").write_text(code)
    return folder


def _env() -> dict[str, str]:
    # No PYTHONPATH: only the installed package (and the folder itself, first on sys.path) can be imported.
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_the_package_is_typed_and_imports_under_one_name(tmp_path):
    code = "import unipt, unipt.pipeline, unipt.extract, unipt.train; print(unipt.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=_user_folder(tmp_path), env=_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (Path(done.stdout.strip()).parent / "py.typed").is_file()


@pytest.mark.e2e
def test_the_readme_api_example_runs_beside_user_files_named_like_the_stages(tmp_path, tiny_config):
    folder = _user_folder(tmp_path / "work")
    code = python_api_example()
    call = 'load_config("configs/rt_minilm.yaml", ["dataset.limit=600", "train.epochs=2"])'
    code = code.replace(call, f'load_config({str(tiny_config)!r}, ["train.epochs=1"])')
    (folder / "api_example.py").write_text(code + "\nprint('predicted', predictions.labels)\n")
    # `python api_example.py` puts the script's folder first on sys.path: the user's train.py comes first.
    done = subprocess.run([sys.executable, "api_example.py"], cwd=folder, env=_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "predicted" in done.stdout


@pytest.mark.e2e
def test_unipt_run_works_from_a_folder_of_user_files_named_like_the_stages(tmp_path, tiny_config):
    folder = _user_folder(tmp_path / "work")
    # `-m` puts the working folder first on sys.path, in the CLI and (through Ray) in its workers.
    done = subprocess.run([sys.executable, "-m", "unipt", "run", str(tiny_config), "--set", "train.epochs=1",
                           "--no-progress"], cwd=folder, env=_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run " in done.stdout


@pytest.mark.parametrize(
    "argv0",
    [
        "/venv/bin/unipt",
        os.path.join("site-packages", "unipt", "__main__.py"),  # python -m unipt
        os.path.join(
            "site-packages", "unipt", "pipeline", "cli", "__main__.py"
        ),  # python -m unipt.pipeline.cli
    ],
)
def test_an_error_names_the_command_to_run_again_whichever_way_unipt_was_started(monkeypatch, argv0):
    from unipt.extract.ray_session import same_command

    monkeypatch.setattr(sys, "argv", [argv0, "extract", "my config.yaml", "--no-progress"])
    assert same_command() == "`unipt extract 'my config.yaml' --no-progress`"
    monkeypatch.setattr(sys, "argv", ["my_script.py", "x"])
    assert same_command() == "the same command"
