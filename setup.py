"""The package layout pyproject.toml cannot say: the top-level folders install under one name, ``unipt``.

``pipeline/``, ``extract/`` and ``train/`` stay where a reader looks for them, but import as
``unipt.pipeline``, ``unipt.extract`` and ``unipt.train``, so nothing a user names ``train.py`` shadows them.
Every subpackage is found, not listed (a listed set once missed two and broke a non-editable install).
"""

from setuptools import find_packages, setup

STAGES = ("pipeline", "extract", "train")

setup(
    packages=["unipt"]
    + [f"unipt.{stage}" for stage in STAGES]
    + [f"unipt.{stage}.{sub}" for stage in STAGES for sub in find_packages(stage)],
    package_dir={"unipt": "unipt", **{f"unipt.{stage}": stage for stage in STAGES}},
    package_data={"unipt": ["py.typed"]},
)
