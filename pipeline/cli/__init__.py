"""The ``unipt`` command line: each module parses one group of commands, calls the recipe and prints."""

from unipt._lazy import lazy_surface

_SURFACE = {
    "build_parser": "app",
    "main": "app",
    "reference": "config_reference",
}
__all__ = sorted(_SURFACE)
__getattr__, __dir__ = lazy_surface(__name__, _SURFACE)
