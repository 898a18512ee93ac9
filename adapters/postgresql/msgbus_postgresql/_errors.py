"""The one place asyncpg exceptions become ``msgbus.errors`` (the original stays on ``__cause__``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import asyncpg
import asyncpg.exceptions as px

from msgbus.adapter import redact
from msgbus.errors import BrokerError, ConfigError, ConnectionLost, MsgbusError, PublishError, TopologyError

# Most specific first; the first matching row wins. The last column is ``retryable`` on the raised error:
# for the adapter it also says "the connection is gone or the server is not ready: reconnect and try again".
_TABLE: tuple[tuple[type[BaseException], type[MsgbusError], bool], ...] = (
    (px.InvalidPasswordError, ConfigError, False),  # wrong credentials: fix the URL
    (px.InvalidAuthorizationSpecificationError, ConfigError, False),  # no such role, or pg_hba refuses it
    (px.InvalidCatalogNameError, ConfigError, False),  # the database does not exist
    (px.InsufficientPrivilegeError, ConfigError, False),  # the role may not create or use msgbus's tables
    (px.UndefinedTableError, TopologyError, False),  # the tables were dropped under us
    (px.CannotConnectNowError, ConnectionLost, True),  # the server is starting up or recovering
    (px.AdminShutdownError, ConnectionLost, True),  # the server is shutting down (a restart, a failover)
    (px.CrashShutdownError, ConnectionLost, True),  # another backend crashed; the server restarts
    (px.TooManyConnectionsError, ConnectionLost, True),  # max_connections reached: slots free up
    (px.ReadOnlySQLTransactionError, ConnectionLost, True),  # a standby after a failover: reconnect to the primary
    (px.PostgresConnectionError, ConnectionLost, True),  # SQLSTATE class 08
    (px.DeadlockDetectedError, BrokerError, True),
    (px.SerializationError, BrokerError, True),
    (px.QueryCanceledError, BrokerError, True),  # statement_timeout on the server
    (px.DiskFullError, BrokerError, True),
    (px.ProgramLimitExceededError, BrokerError, False),  # a row or value over PostgreSQL's own limits
    (px.PostgresError, BrokerError, False),  # any other refusal: trying again cannot help
    (px.ConnectionDoesNotExistError, ConnectionLost, True),  # the link dropped mid-statement
    (asyncpg.InterfaceError, ConnectionLost, True),  # "connection is closed", "another operation in progress"
    # The client's protocol state went wrong, seen after a server restart ("cannot switch to state 12; another
    # operation (2) is in progress"): that connection is dropped and the operation tried on a fresh one.
    (px.InternalClientError, ConnectionLost, True),
    (TimeoutError, ConnectionLost, True),  # no answer within command_timeout: the connection may be half-open
    (OSError, ConnectionLost, True),
)

DRIVER_ERRORS = (px.PostgresError, asyncpg.InterfaceError, px.InternalClientError, TimeoutError, OSError)


def convert(
    exc: BaseException, doing: str, secrets: Sequence[str | None] = (), *, publish: bool = False
) -> MsgbusError:
    """The msgbus error for ``exc`` (unknown exceptions become ``BrokerError``), with secrets removed.

    ``publish`` marks a send: a refusal there that is not about the connection is a ``PublishError``.
    """
    kind: type[MsgbusError] = BrokerError
    retryable = True
    for source, target, can_retry in _TABLE:
        if isinstance(exc, source):
            kind, retryable = target, can_retry
            break
    if publish and kind is BrokerError:
        kind = PublishError
    detail = redact(str(exc) or type(exc).__name__, list(secrets))
    err = kind(f"PostgreSQL: {doing} failed: {type(exc).__name__}: {detail}")
    if err.retryable != retryable:
        err.retryable = retryable
    return err


@contextmanager
def translate(doing: str, secrets: Sequence[str | None] = (), *, publish: bool = False) -> Iterator[None]:
    """Re-raise asyncpg (and socket) errors raised inside the block as msgbus errors saying what failed."""
    try:
        yield
    except MsgbusError:
        raise
    except DRIVER_ERRORS as exc:
        raise convert(exc, doing, secrets, publish=publish) from exc
