"""What both stages share: cache format, dataset/cache/run identity, config loading and the CLI.

Nothing here imports ``extract`` or ``train`` (except :mod:`unipt.pipeline.cli.app`, which wires the stages).
"""

FORMAT_VERSION = 4
"""Version of the on-disk activation cache format; part of every cache key.

4: activation spaces, segments and views (specified in ``docs/cache-format.md``): the backbone's rows are
stored once
per input in segments (each a format-3-style Zarr store), a dataset version is a small view over them.
3: every chunk ends in a crc32c checked on read, and the manifest (``checksums.json``) also covers
every ``zarr.json`` and ``examples.parquet``. 2: no per-chunk checksum; ``unipt cache verify`` (the
manifest of data files) is its only check.
"""

READABLE_FORMAT_VERSIONS = (2, 3, 4)
"""Format versions this code reads; it writes only :data:`FORMAT_VERSION`."""
