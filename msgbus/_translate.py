"""One error translator for every adapter: an adapter writes its table, ``ErrorTable`` applies it.

The rules, the same for every backend:

- Rows are tried in order and the first that matches wins, so the most specific goes first. A row matches
  an exception type (``isinstance``) or a predicate (a broker's reply code, an AWS error code).
- The error keeps the original on ``__cause__``; its text is ``"<Backend>: <doing> failed: <Type>: <detail>"``
  with the known secrets (``redact``) and anything that looks like one (a URL's password, ``key=value``)
  scrubbed.
- ``retryable`` per row: ``None`` keeps the error class's default (``BrokerError`` and its kinds: true;
  ``TopologyError``, ``ConfigError``, ``InvalidMessage``: false).
- **A failed send** (``publish=True``): what the table makes a plain ``BrokerError`` becomes a
  ``PublishError`` (same ``retryable``): the broker refused or failed the send, so the message may not be
  stored. Every other kind stays as it is: ``ConnectionLost`` (the link, not a refusal), ``TopologyError``,
  ``InvalidMessage``, ``ConfigError``, and rows that already say ``PublishError``.
- ``translated`` leaves alone what no row matches (a bug, or a user's exception): it propagates as it is.
  ``convert`` makes it a ``BrokerError`` (``PublishError`` on a send). A ``MsgbusError`` is already
  translated and passes through both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

from ._url import _scrub, redact
from .errors import BrokerError, MsgbusError, PublishError

#: What a row matches: an exception type (or several), or a predicate on the exception.
Match = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]


class ErrorRow(NamedTuple):
    """One row of an ``ErrorTable``: what it matches and the ``msgbus.errors`` class it becomes."""

    match: Match
    error: type[MsgbusError]
    retryable: bool | None = None  # None: the error class's default
    hint: str = ""  # appended to the message: what the user can do about it
    sends_only: bool = False  # applies only to a failed send (``publish=True``)


class ErrorTable:
    """A backend's ordered translation table from client-library exceptions to ``msgbus.errors``."""

    def __init__(self, backend: str, rows: Iterable[ErrorRow | tuple[Match, type[MsgbusError], bool | None]]) -> None:
        self.backend = backend
        self.rows = tuple(row if isinstance(row, ErrorRow) else ErrorRow(*row) for row in rows)

    def row(self, exc: BaseException, *, publish: bool = False) -> ErrorRow | None:
        """The first row that matches ``exc`` (rows marked ``sends_only`` only when ``publish``), or None."""
        for row in self.rows:
            if row.sends_only and not publish:
                continue
            match = row.match
            if isinstance(match, type | tuple):
                if isinstance(exc, match):
                    return row
            elif match(exc):
                return row
        return None

    def convert(
        self, exc: BaseException, doing: str, secrets: Sequence[str | None] = (), *, publish: bool = False
    ) -> MsgbusError:
        """The ``msgbus`` error for ``exc`` raised while ``doing`` (``publish``: a send), secrets scrubbed.

        Raise it ``from exc``. An exception no row matches becomes a ``BrokerError`` (``PublishError`` on a send).
        """
        if isinstance(exc, MsgbusError):
            return exc
        row = self.row(exc, publish=publish) or _UNKNOWN
        kind = PublishError if publish and row.error is BrokerError else row.error
        detail = _scrub(redact(str(exc), list(secrets)))
        text = f"{self.backend}: {doing} failed: {type(exc).__name__}" + (f": {detail}" if detail else "")
        err = kind(text + row.hint)
        if row.retryable is not None and err.retryable != row.retryable:
            err.retryable = row.retryable
        return err

    @contextmanager
    def translated(self, doing: str, secrets: Sequence[str | None] = (), *, publish: bool = False) -> Iterator[None]:
        """Re-raise an exception of the block that a row matches as its ``msgbus`` error, ``from`` the original;
        anything else (``MsgbusError`` included) propagates unchanged. A cancellation the client library lost
        is raised again when the block ends (``_lost_cancel``)."""
        before = _cancel_requests()
        try:
            yield
        except MsgbusError:
            raise
        except Exception as exc:
            if self.row(exc, publish=publish) is None:
                raise
            raise self.convert(exc, doing, secrets, publish=publish) from exc
        if _cancel_requests() > before:
            raise asyncio.CancelledError(_LOST_CANCEL)


# On Python 3.11, ``asyncio.wait_for`` returns the result when the call it waits on finished just as its task
# was cancelled, and the cancellation is gone (fixed in 3.12). redis-py (since 8.0, whose socket_timeout
# defaults to 5 s, and with msgbus's own socket_timeout) sends every command through it: a stop(), a close()
# or a timeout around a Redis call was lost about one time in two, and a loop waiting on it ran forever.
_LOST_CANCEL = "cancelled while in a client call that did not raise it (Python 3.11 asyncio.wait_for)"


def _cancel_requests() -> int:
    """How many cancel requests the running task has pending (0 outside a task)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running event loop: synchronous code
        return 0
    return task.cancelling() if task is not None else 0


_UNKNOWN = ErrorRow(BaseException, BrokerError)
