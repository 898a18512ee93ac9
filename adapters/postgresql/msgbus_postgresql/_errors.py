"""asyncpg exceptions -> ``msgbus.errors``: the table; ``msgbus.adapter.ErrorTable`` applies it (its docstring
has the rules, a failed send's included)."""

from __future__ import annotations

import asyncpg
import asyncpg.exceptions as px

from msgbus.adapter import ErrorTable
from msgbus.errors import BrokerError, ConfigError, ConnectionLost, TopologyError

# Most specific first; the first matching row wins. The last column is ``retryable`` on the raised error:
# for the adapter it also says "the connection is gone or the server is not ready: reconnect and try again".
ERRORS = ErrorTable(
    "PostgreSQL",
    [
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
    ],
)
convert = ERRORS.convert
translated = ERRORS.translated

DRIVER_ERRORS = (px.PostgresError, asyncpg.InterfaceError, px.InternalClientError, TimeoutError, OSError)
