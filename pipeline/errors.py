"""One exception type for problems the user can fix; the CLI prints its message as one line."""


class UniptError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it."""


class CacheMissing(UniptError):
    """No committed cache (or segment) where one was named: extract it, or copy the whole cache root."""


class CacheDamaged(UniptError):
    """A cache's bytes or metadata contradict its checksums or its attributes: verify and re-extract it."""
