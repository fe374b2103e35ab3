"""Errors as the one line a user reads: what went wrong, where, and what to do."""

from __future__ import annotations


def one_line(error: BaseException) -> str:
    """An exception as one line: its message with white space folded, or its type's name
    when it has no message."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


class TrackingError(RuntimeError):
    """The MLflow store cannot be reached, or refused or lost part of a run; the message is
    one line that names the store and what to do."""
