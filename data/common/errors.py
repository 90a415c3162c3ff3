"""Turning someone else's exception into a short, printable piece of one of our one-line messages."""

from __future__ import annotations


def one_line(err: BaseException, limit: int = 100, *, with_type: bool = True) -> str:
    """The exception's first non-empty line, printable and at most `limit` characters (+ "..."),
    prefixed with its type name unless `with_type` is False; the bare type name if it says nothing."""
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    first = "".join(c if c.isprintable() else "?" for c in first)
    first = first if len(first) <= limit else first[:limit] + "..."
    if not first:
        return type(err).__name__
    return f"{type(err).__name__}: {first}" if with_type else first
