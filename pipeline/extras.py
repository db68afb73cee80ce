"""Optional extras: which ``pip install 'unipt-cache[EXTRA]'`` brings which import, and the one line
that says so when a command needs a module the base install leaves out.

The base install trains from a cache and reads, lists and verifies caches; everything else is an extra
(pyproject.toml's ``[project.optional-dependencies]``).
"""

from __future__ import annotations

import importlib.util

from unipt.pipeline.errors import UniptError

# Top-level import name -> the extra that installs it.
EXTRA_OF: dict[str, str] = {
    "ray": "extract",
    "transformers": "extract",
    "tokenizers": "extract",
    "huggingface_hub": "extract",
    "PIL": "extract",
    "h5py": "hdf5",
    "s3fs": "s3",
    "matplotlib": "plots",
    "datasets": "hf-datasets",
    "mlflow": "tracking",
    "tensorboard": "tracking",
}


def install_hint(module: str) -> str:
    """``pip install 'unipt-cache[EXTRA]'`` for a module of an extra (or the module itself otherwise)."""
    extra = EXTRA_OF.get(module.split(".")[0])
    return f"pip install 'unipt-cache[{extra}]'" if extra else f"pip install {module.split('.')[0]}"


def has(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a half-installed module
        return False


def require(module: str, what: str) -> None:
    """Refuse ``what`` in one line when ``module`` (from an extra) is not installed."""
    if not has(module):
        raise UniptError(f"{what} needs {module}, which is not installed; {install_hint(module)}")


def missing_extra_message(exc: ModuleNotFoundError, command: str) -> str | None:
    """The one-line error for a command that reached an import the base install lacks; None when the
    missing module belongs to no extra (then it is a broken install or a bug, and keeps its traceback)."""
    module = (exc.name or "").split(".")[0]
    if module not in EXTRA_OF:
        return None
    return f"unipt {command} needs {module}, which is not installed; {install_hint(module)}"
