"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A mistake in input (path, column, config key/value, unreachable service), reported before work."""
