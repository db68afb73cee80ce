"""What both stages share: cache format, dataset/cache/run identity, config loading and the CLI.

Nothing here imports ``extract`` or ``train`` (except :mod:`pipeline.cli`, which wires the stages).
"""

FORMAT_VERSION = 3
"""Version of the on-disk activation cache format; part of every cache key.

3: every chunk ends in a crc32c checked on read, and the manifest (``checksums.json``) also covers
every ``zarr.json`` and ``examples.parquet``. 2: no per-chunk checksum; ``unipt cache verify`` (the
manifest of data files) is its only check.
"""

READABLE_FORMAT_VERSIONS = (2, 3)
"""Format versions this code reads; it writes only :data:`FORMAT_VERSION`."""
