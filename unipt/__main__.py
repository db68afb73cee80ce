"""``python -m unipt ...`` is the ``unipt`` command."""

import sys

from unipt.pipeline.cli.app import main

sys.exit(main())
