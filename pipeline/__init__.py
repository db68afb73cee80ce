"""What both stages share: cache format, dataset/cache/run identity, config loading and the CLI.

Nothing here imports ``extract`` or ``train`` (except :mod:`pipeline.cli`, which wires the stages).
"""

FORMAT_VERSION = 2
"""Version of the on-disk activation cache format; part of every cache key."""
