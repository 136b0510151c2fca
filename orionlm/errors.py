"""The base of every error caused by user input: the CLI prints its message on one line and exits 2."""


class OrionError(ValueError):
    """A mistake the user can fix: a bad config, a missing or corrupt file, an invalid argument."""
