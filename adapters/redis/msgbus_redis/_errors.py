"""The one place redis-py exceptions become ``msgbus.errors`` (the original stays on ``__cause__``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from redis import exceptions as rx

from msgbus.adapter import redact
from msgbus.errors import (
    BrokerError,
    ConfigError,
    ConnectionLost,
    InvalidMessage,
    MsgbusError,
    PublishError,
    TopologyError,
)

# Most specific first; the first matching row wins. ``retryable`` None keeps the class default.
_TABLE: tuple[tuple[type[BaseException], type[MsgbusError], bool | None], ...] = (
    (rx.AuthenticationError, ConfigError, None),  # wrong credentials: fix the URL, do not retry
    (rx.AuthorizationError, BrokerError, False),
    (rx.NoPermissionError, BrokerError, False),  # ACL forbids a command or key
    (rx.ConnectionError, ConnectionLost, None),  # includes BusyLoadingError (Redis still loading its AOF)
    (rx.TimeoutError, ConnectionLost, None),
    (OSError, ConnectionLost, None),
    (rx.DataError, InvalidMessage, None),
    (rx.ReadOnlyError, BrokerError, None),  # talking to a replica, e.g. during failover
    (rx.OutOfMemoryError, BrokerError, None),  # maxmemory reached: may clear once consumers catch up
    (rx.RedisError, BrokerError, None),
)


def is_nogroup(exc: BaseException) -> bool:
    """Whether Redis answered that the stream or its consumer group does not exist."""
    return isinstance(exc, rx.ResponseError) and str(exc).startswith("NOGROUP")


def translate(
    exc: BaseException, action: str, *, publish: bool = False, secrets: Sequence[str | None] = ()
) -> Exception:
    """The ``msgbus`` error for ``exc``; ``publish`` marks a send, whose refusals are ``PublishError``."""
    text = f"redis {action} failed: {redact(str(exc) or type(exc).__name__, list(secrets))}"
    if is_nogroup(exc):
        return TopologyError(text)
    for source, target, retryable in _TABLE:
        if isinstance(exc, source):
            if publish and target is BrokerError and retryable is None:
                target = PublishError
            err = target(text)
            if retryable is not None:
                err.retryable = retryable
            return err
    return BrokerError(text)


@contextmanager
def translated(action: str, *, publish: bool = False, secrets: Sequence[str | None] = ()) -> Iterator[None]:
    """Re-raise any redis-py (or socket) exception in the block as a ``msgbus`` error, ``from`` the original."""
    try:
        yield
    except MsgbusError:
        raise
    except (rx.RedisError, OSError) as exc:
        raise translate(exc, action, publish=publish, secrets=secrets) from exc
