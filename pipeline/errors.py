"""One exception type for problems the user can fix; the CLI prints its message as one line."""


class UniptError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it."""
