"""unipt-cache: run a frozen backbone once into a Zarr activation cache, then tune UniPT on it.

The import name of the whole project. Its three stages live in the repository's top-level folders and
install under this one name, so a user's own ``train.py`` or ``pipeline.py`` never shadows them:

- :mod:`unipt.pipeline`: what both stages share (cache format, dataset/cache/run identity, config, the
  recipe :mod:`unipt.pipeline.experiment` and the CLI);
- :mod:`unipt.extract`: the backbone running under Ray, writing the cache;
- :mod:`unipt.train`: UniPT and the other methods, trained from a cache with no backbone in memory.
"""

from unipt.pipeline import FORMAT_VERSION

__all__ = ["FORMAT_VERSION"]
