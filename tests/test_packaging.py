"""Packaging: ranges in pyproject.toml, exact pins in requirements-lock.txt that meet them, lean extras, and
the Python versions the README claims are the ones pyproject.toml states."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from unipt.pipeline.extras import EXTRA_OF

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# What training from a cache and `unipt cache ls/info/verify` import: all the base install may hold.
BASE = {
    "torch",
    "zarr",
    "numcodecs",
    "fsspec",
    "pyarrow",
    "numpy",
    "google-crc32c",
    "pydantic",
    "pyyaml",
    "tqdm",
    "safetensors",
}
EXTRAS = {"extract", "hdf5", "s3", "plots", "hf-datasets", "tracking", "all", "dev"}


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier  # exactly one ==, nothing else
        assert spec.operator == "==" and "*" not in spec.version, f"not an exact pin: {line}"
        pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def _requirements() -> list[tuple[str, Requirement]]:
    """(where, requirement) for the base and every extra, self-references (unipt-cache[...]) left out."""
    listed = [("dependencies", Requirement(r)) for r in PROJECT["dependencies"]]
    for extra, requirements in PROJECT["optional-dependencies"].items():
        listed += [(f"[{extra}]", Requirement(r)) for r in requirements]
    return [(where, r) for where, r in listed if canonicalize_name(r.name) != "unipt-cache"]


def test_the_lock_pins_every_requirement_within_its_range():
    lock = _lock()
    environment = default_environment()
    for where, requirement in _requirements():
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement} ({where}) has no pin in requirements-lock.txt"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"requirements-lock.txt pins {name}=={lock[name]}, outside {where}'s {requirement}"
        )


def test_the_package_states_ranges_not_pins():
    for where, requirement in _requirements():
        if where == "[dev]" and canonicalize_name(requirement.name) == "ruff":
            continue  # the formatter's output changes between releases: pinned on purpose
        operators = {spec.operator for spec in requirement.specifier}
        assert operators and "==" not in operators, f"{where}: {requirement} is not a range"


def test_the_base_install_is_what_training_from_a_cache_needs_and_extras_cover_the_rest():
    base = {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
    assert base == {canonicalize_name(n) for n in BASE}
    extras = PROJECT["optional-dependencies"]
    assert EXTRAS <= set(extras)
    everything = {
        canonicalize_name(Requirement(r).name) for name in extras if name != "dev" for r in extras[name]
    }
    assert {"ray", "transformers", "h5py", "matplotlib", "pillow", "datasets", "mlflow-skinny"} <= everything
    (all_,) = extras["all"]
    assert set(Requirement(all_).extras) == set(extras) - {"all", "dev"}  # every stage's extra
    # Every module a command may ask for names an extra that exists.
    assert set(EXTRA_OF.values()) <= set(extras)


def test_python_versions_are_the_ones_the_readme_says_ci_runs():
    requires = SpecifierSet(PROJECT["requires-python"])
    assert "3.11.7" in requires and "3.12.1" in requires
    assert (
        "3.10.13" not in requires and "3.13.0" not in requires
    )  # 3.10 cannot install the pins; 3.13 never ran
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"Python 3\.11 and 3\.12", readme)
    assert "test-py312" in (ROOT / "Makefile").read_text()


def test_no_package_is_listed_twice_between_the_base_and_an_extra():
    base = {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
    for name, requirements in PROJECT["optional-dependencies"].items():
        names = [canonicalize_name(Requirement(r).name) for r in requirements]
        assert len(names) == len(set(names)), f"[{name}] lists a package twice"
        assert not base & set(names), f"[{name}] repeats base packages {sorted(base & set(names))}"


def test_ruff_targets_the_oldest_python_the_package_installs_on():
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["target-version"]
    requires = SpecifierSet(PROJECT["requires-python"])
    oldest = min(v for v in ("3.9", "3.10", "3.11", "3.12", "3.13") if f"{v}.0" in requires)
    assert target == "py" + oldest.replace(".", "")
