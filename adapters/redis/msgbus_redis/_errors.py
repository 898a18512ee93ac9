"""redis-py exceptions -> ``msgbus.errors``: the table; ``msgbus.adapter.ErrorTable`` applies it (its docstring
has the rules, a failed send's included)."""

from __future__ import annotations

from redis import exceptions as rx

from msgbus.adapter import ErrorRow, ErrorTable
from msgbus.errors import BrokerError, ConfigError, ConnectionLost, InvalidMessage, TopologyError


def is_nogroup(exc: BaseException) -> bool:
    """Whether Redis answered that the stream or its consumer group does not exist."""
    return isinstance(exc, rx.ResponseError) and str(exc).startswith("NOGROUP")


# Most specific first; the first matching row wins. ``retryable`` None keeps the class default.
ERRORS = ErrorTable(
    "Redis",
    [
        ErrorRow(is_nogroup, TopologyError),
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
    ],
)
convert = ERRORS.convert
translated = ERRORS.translated
