"""URL options of ``postgresql://`` buses, read once into a frozen dataclass."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from msgbus.adapter import BusURL, OptionReader
from msgbus.errors import ConfigError

# The schema name goes into SQL text (quoted), so it is held to a plain identifier.
_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")
SSL_MODES = ("disable", "prefer", "allow", "require", "verify-ca", "verify-full")


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    """Everything the adapter needs from the URL. Holds the password, so its repr shows none of it."""

    host: str
    port: int
    user: str | None
    password: str | None
    database: str | None
    sslmode: str
    schema: str  # the PostgreSQL schema holding msgbus's tables
    visibility_timeout: float  # the lease: an unsettled message is delivered again after this long
    poll_interval: float  # longest wait between looks at the table when no notification came
    pool_size: int  # connections for sends, leases and settlements (plus one that LISTENs)
    command_timeout: float  # one statement; a connection that does not answer in time is dropped
    connect_timeout: float
    reconnect_timeout: float  # how long an operation retries through a lost connection before raising
    keepalive_interval: float  # the listening connection is pinged this often (a silent link is noticed)
    max_message_size: int

    def __repr__(self) -> str:
        return (
            f"PostgresOptions(host={self.host!r}, port={self.port}, database={self.database!r}, schema={self.schema!r})"
        )

    @property
    def secrets(self) -> tuple[str | None, ...]:
        return (self.password,)

    @property
    def channel(self) -> str:
        """The NOTIFY channel of this schema's bus."""
        return f"msgbus_{self.schema}"


def read_options(url: BusURL, reader: OptionReader) -> PostgresOptions:
    """Read the adapter's options; the caller rejects unknown ones afterwards.

    ``postgresql://user:password@host:5432/database`` like libpq (a missing user, password or database is
    left to the server's defaults: the user's name, ``PGPASSWORD`` or ``~/.pgpass`` are not read).
    """
    database = unquote(url.path[1:]) if url.path.startswith("/") else url.path
    if "/" in database:
        raise ConfigError(f"a postgresql:// URL names one database, got path {url.path!r}")
    schema = reader.str("schema", "msgbus") or "msgbus"
    if not _SCHEMA.match(schema):
        raise ConfigError(f"option 'schema' must be 1-48 lower-case letters, digits or '_', got {schema!r}")
    options = PostgresOptions(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or None,
        password=url.password,
        database=database or None,
        sslmode=reader.choice("sslmode", "prefer", SSL_MODES),
        schema=schema,
        visibility_timeout=reader.float("visibility_timeout", 30.0, min=0.1),
        poll_interval=reader.float("poll_interval", 2.0, min=0.01),
        pool_size=reader.int("pool_size", 10, min=1),
        command_timeout=reader.float("command_timeout", 30.0, min=0.1),
        connect_timeout=reader.float("connect_timeout", 10.0, min=0.1),
        reconnect_timeout=reader.float("reconnect_timeout", 60.0, min=0.0),
        keepalive_interval=reader.float("keepalive_interval", 5.0, min=0.1),
        max_message_size=reader.int("max_message_size", 1_048_576, min=1),
    )
    if options.max_message_size > 256 * 1024 * 1024:
        raise ConfigError("option 'max_message_size' must be <= 268435456 (256 MiB; PostgreSQL's bytea holds 1 GiB)")
    if options.pool_size > 1000:
        raise ConfigError("option 'pool_size' must be <= 1000")
    return options
