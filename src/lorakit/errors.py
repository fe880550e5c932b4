"""The error type for user mistakes."""


class LorakitError(Exception):
    """A user mistake: the CLI prints it as one line and exits non-zero."""
