"""Errors as the one line a user reads: what went wrong, where, and what to do."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


def one_line(error: BaseException) -> str:
    """An exception as one line: its message with white space folded, or its type's name
    when it has no message."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


class TrackingError(RuntimeError):
    """The MLflow store cannot be reached, or refused or lost part of a run; the message is
    one line that names the store and what to do."""


_SIGNALS: list[int] = []  # the stop signals this process has received
_WRITING = [0]  # store writes under way (whole_writes)


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """The handler of Ctrl-C (SIGINT) and SIGTERM (a scheduler, `kill`): raises
    KeyboardInterrupt, so that every active run ends KILLED, and remembers the signal.

    Python drops an exception raised while a finalizer runs ("Exception ignored in ..."),
    and a signal can land in one (SQLAlchemy cleans its objects up that way):
    :func:`check_interrupt` raises it again. During a store write (:func:`whole_writes`)
    it is raised when the write is done.
    """
    _SIGNALS.append(signum)
    if not _WRITING[0]:
        raise KeyboardInterrupt


@contextmanager
def whole_writes() -> Iterator[None]:
    """A store write that Ctrl-C or SIGTERM does not cut: an interrupt in the middle of a
    SQLite transaction left the database locked for the process's own cleanup (the run then
    could not be ended KILLED). A signal that comes meanwhile is raised at the end."""
    before = len(_SIGNALS)
    _WRITING[0] += 1
    try:
        yield
    finally:
        _WRITING[0] -= 1
    if len(_SIGNALS) > before and not _WRITING[0]:
        raise KeyboardInterrupt


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if a stop signal came, even one a finalizer swallowed."""
    if _SIGNALS:
        raise KeyboardInterrupt


def stop_on_signals() -> None:
    """Install :func:`raise_interrupt` for SIGINT and SIGTERM (in the main thread)."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, raise_interrupt)
