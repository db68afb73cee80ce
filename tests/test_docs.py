"""The documentation is kept true by tests: the README's own-data commands run as written, the
configuration reference matches the code, and every link between the pages lands."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_sentiment_rows, write_csv

from unipt.pipeline.cli.config_reference import reference
from unipt.pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def test_the_configuration_reference_is_generated_from_the_code():
    committed = (DOCS / "configuration.md").read_text()
    assert committed == reference(), (
        "run: python -m unipt.pipeline.cli.config_reference > docs/configuration.md"
    )


def test_the_readme_stays_a_front_door():
    assert len(README.read_text().splitlines()) <= 300


def _anchors(markdown: str) -> set[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    headings = re.findall(r"^#{1,6} (.+)$", text, flags=re.M)
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
    return slugs | set(re.findall(r'<a id="([^"]+)"></a>', text))


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_every_link_between_the_pages_lands(page: Path):
    text = page.read_text()
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path.read_text()), f"{page.name} links to {target}#{anchor}"


def _own_data_block() -> tuple[str, list[str]]:
    text = README.read_text()
    section = text[text.index("## Your own data") :]
    yaml_block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return yaml_block, [line.split("#")[0].strip() for line in commands.splitlines() if line.strip()]


def test_the_readme_config_is_the_shipped_one_and_every_required_key_is_in_it():
    yaml_block, _ = _own_data_block()
    shipped = (ROOT / "configs" / "my_data.yaml").read_text()
    assert yaml_block.strip() in shipped
    config = load_config(ROOT / "configs" / "my_data.yaml")  # no name: the file's stem
    assert config.name == "my_data" and config.dataset.source == "my_reviews.csv"


@pytest.mark.e2e
def test_your_own_data_runs_as_the_readme_says(tmp_path: Path, tiny_bert_dir: Path):
    """plan -> run -> predict, the README's three commands, from a fresh folder with the user's CSV.
    Only the backbone is swapped for the tiny one (the bundled MiniLM is tested elsewhere)."""
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "my_data.yaml", tmp_path / "configs" / "my_data.yaml")
    write_csv(
        tmp_path / "my_reviews.csv", [{k: r[k] for k in ("text", "label")} for r in make_sentiment_rows(120)]
    )
    write_csv(tmp_path / "new_reviews.csv", [{"text": r["text"]} for r in make_sentiment_rows(5, seed=9)])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    _, commands = _own_data_block()
    run_dir = None
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == ".venv/bin/unipt"
        if run_dir is not None:
            argv = [arg.replace(".unipt/runs/<id>", str(run_dir)) for arg in argv]
        if argv[1] in ("plan", "run"):
            argv += ["--set", f"backbone.name_or_path={tiny_bert_dir}", "--set", "train.epochs=1"]
        if argv[1] == "run":
            argv.append("--no-progress")
        result = subprocess.run(
            [sys.executable, "-m", "unipt.pipeline.cli", *argv[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{command}:\n{result.stderr[-3000:]}"
        if argv[1] == "run":
            (run_dir,) = (tmp_path / ".unipt" / "runs").iterdir()
            assert f"run .unipt/runs/{run_dir.name}" in result.stderr + result.stdout
    predictions = (tmp_path / "predictions.csv").read_text().splitlines()
    assert len(predictions) == 6 and "pos" in predictions[0] and "neg" in predictions[0]
