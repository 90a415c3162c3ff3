"""Errors the CLI prints as one line and exits non-zero on: the user's mistakes (exit 2) and outputs
rejected as unusable (exit 1)."""


class UserError(Exception):
    """A mistake in input (path, column, config key/value, unreachable service), reported before work."""


class RejectedOutput(Exception):
    """A stage finished but its output is not worth keeping (a crawl during an outage, nothing kept): it is
    not marked complete, not adopted by other runs and not resumed; the next run makes it again."""
