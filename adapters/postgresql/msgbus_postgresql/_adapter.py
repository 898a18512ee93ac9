"""The PostgreSQL adapter: queues and subscriptions are rows, leased with ``FOR UPDATE SKIP LOCKED``.

See ``docs/adapters/postgresql.md`` for the mapping, the options and the limits this module implements.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import asyncpg
import asyncpg.exceptions as px

from msgbus.adapter import Adapter, BusURL, Capabilities, Endpoint, OptionReader, Record, deleted_queue, wait_set
from msgbus.errors import ClosedError, ConfigError, MessageTooLarge, TopologyError

from ._codec import encode
from ._config import PostgresOptions, read_options
from ._errors import DRIVER_ERRORS, convert, translated
from ._receiver import PostgresReceiver
from ._schema import SETUP_LOCK, Statements

__all__ = ["PostgresAdapter", "create"]

log = logging.getLogger("msgbus.postgresql")

T = TypeVar("T")

# Errors after which a connection is not trusted again: it is closed, and the pool opens a fresh one.
_BROKEN = (
    TimeoutError,
    OSError,
    asyncpg.InterfaceError,
    px.InternalClientError,
    px.PostgresConnectionError,
    px.AdminShutdownError,
    px.CrashShutdownError,
    px.CannotConnectNowError,
)


def create(url: BusURL, options: OptionReader) -> PostgresAdapter:
    """Entry point for ``postgresql://`` (and ``postgres://``) URLs; does no I/O."""
    return PostgresAdapter(url, read_options(url, options))


async def _reset(conn: Any) -> None:
    # Replaces the pool's default reset query (UNLISTEN, RESET ALL, ...), a round trip per statement: msgbus's
    # pooled connections keep no session state (asyncpg still rolls back a transaction left open).
    return None


class PostgresAdapter(Adapter):
    """A connection pool for statements plus one listening connection, shared by every sender and receiver.

    Task-safe within its event loop. Operations that lose their connection retry on a fresh one until
    ``reconnect_timeout``; a statement unanswered after ``command_timeout`` closes its connection.
    """

    # A lease: one FOR UPDATE SKIP LOCKED statement (a commit) takes up to this many rows, and the settled ones
    # go in one DELETE per batch; run() extends the lease of what it holds. Not more: leased rows are rows no
    # competing consumer can take, and per-key ordering holds a key's later rows behind a leased one.
    credit = 128

    def __init__(self, url: BusURL, options: PostgresOptions) -> None:
        self.url = url
        self._options = options
        self._sql = Statements.for_schema(options.schema, options.channel)
        self.capabilities = Capabilities(
            ordering="per_key",
            delayed_delivery=True,
            delayed_nack=True,
            native_dead_letter=True,  # moved by one statement in the server, never re-sent by the client
            max_message_size=options.max_message_size,
            persistence="disk",
            cross_process=True,
            lock_extension=True,
            restartable=True,
            lock_duration=options.visibility_timeout,
            exactly_once=False,
            counts_deliveries=True,  # attempts + 1 at every lease, by the server
        )
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()  # set while a connection LISTENs (tests wait for it)
        self._waiters: dict[int, set[asyncio.Event]] = {}
        self._ids: dict[tuple[str, str, str, bool], int] = {}
        self._tables = False
        self._closed = False

    def __repr__(self) -> str:
        return f"PostgresAdapter({self.url.redacted!r})"

    @property
    def options(self) -> PostgresOptions:
        return self._options

    @property
    def sql(self) -> Statements:
        return self._sql

    @property
    def pool(self) -> asyncpg.Pool | None:
        """The asyncpg pool (escape hatch; None until open)."""
        return self._pool

    # -- connection ---------------------------------------------------------------------------------

    def _connect_args(self) -> dict[str, Any]:
        o = self._options
        return {
            "host": o.host,
            "port": o.port,
            "user": o.user,
            "password": o.password,
            "database": o.database,
            "ssl": o.sslmode,
            "timeout": o.connect_timeout,
            "command_timeout": o.command_timeout,
            "server_settings": {"application_name": "msgbus"},
        }

    async def open(self) -> None:
        """Open the pool (one connection at once, checking the server and the credentials) and start listening."""
        if self._closed:
            raise ClosedError(f"{self!r} is closed")
        if self._pool is not None:
            return
        o = self._options
        with translated(f"connect to {self.url.redacted}", o.secrets):
            pool = await asyncpg.create_pool(
                min_size=1,
                max_size=o.pool_size,
                reset=_reset,
                max_inactive_connection_lifetime=60.0,
                **self._connect_args(),
            )
        self._pool = pool
        self._listener = asyncio.get_running_loop().create_task(self._listen(), name=f"msgbus-listen:{o.channel}")

    async def close(self) -> None:
        """Stop listening and close every connection; idempotent. Held leases run out on the server."""
        self._closed = True
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                async with asyncio.timeout(self._options.command_timeout):
                    await pool.close()
            except (TimeoutError, *DRIVER_ERRORS):
                pool.terminate()
        for events in list(self._waiters.values()):
            for event in events:
                event.set()

    async def run(self, doing: str, fn: Callable[[Any], Awaitable[T]], *, publish: bool = False) -> T:
        """``fn(connection)`` on a pooled connection, retried on a fresh one while the server is unreachable.

        Gives up after ``reconnect_timeout`` with the last error (``ConnectionLost``); errors that trying again
        cannot fix are raised at once. Every error raised is a ``msgbus.errors`` type.
        """
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        pause = 0.05
        while True:
            pool = self._pool
            if pool is None:
                raise ClosedError(f"{self!r} is {'closed' if self._closed else 'not open'}")
            try:
                # No acquire timeout (it costs a task per operation): every statement has command_timeout, so a
                # busy pool always frees a connection in bounded time; opening one has connect_timeout.
                async with pool.acquire() as conn:
                    try:
                        return await fn(conn)
                    except _BROKEN:
                        conn.terminate()
                        raise
            except DRIVER_ERRORS as exc:
                err = convert(exc, doing, self._options.secrets, publish=publish)
                if not err.retryable or self._closed:
                    raise err from exc
                now = loop.time()
                if deadline is None:
                    deadline = now + self._options.reconnect_timeout
                    log.warning("postgresql: %s; retrying for up to %gs", err, self._options.reconnect_timeout)
                if now + pause > deadline:
                    raise err from exc
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)

    # -- notifications ------------------------------------------------------------------------------

    def listen(self, endpoint_id: int, wake: asyncio.Event) -> None:
        self._waiters.setdefault(endpoint_id, set()).add(wake)

    def unlisten(self, endpoint_id: int, wake: asyncio.Event) -> None:
        events = self._waiters.get(endpoint_id)
        if events is not None:
            events.discard(wake)
            if not events:
                del self._waiters[endpoint_id]

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            endpoint_id = int(payload)
        except ValueError:
            return
        for event in self._waiters.get(endpoint_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for events in self._waiters.values():
            for event in events:
                event.set()

    async def _listen(self) -> None:
        """Hold one connection that LISTENs, pinging it every ``keepalive_interval``; replace it when it fails.

        Notifications sent while no connection listened are lost, so every receiver is woken to look for
        itself after each (re)connect.
        """
        o = self._options
        pause = 0.1
        while not self._closed:
            conn: Any = None
            try:
                conn = await asyncpg.connect(**self._connect_args())
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(o.channel, self._notified)
                self._listening.set()
                self._wake_all()
                pause = 0.1
                while True:
                    if not await wait_set(lost, o.keepalive_interval):
                        await conn.fetchval("SELECT 1", timeout=o.command_timeout)
                    else:
                        raise ConnectionResetError("the listening connection closed")
            except Exception as exc:  # whatever it was, this task must go on: receivers rely on its wake-ups
                if not self._closed:
                    log.warning("postgresql: listening connection lost (%s); reconnecting", convert(exc, "listen"))
            finally:
                self._listening.clear()
                if conn is not None:
                    conn.terminate()
            self._wake_all()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    # -- topology -----------------------------------------------------------------------------------

    async def _ensure_tables(self, create: bool) -> None:
        if self._tables:
            return
        sql = self._sql

        async def setup(conn: Any) -> None:
            if not create:
                if not await conn.fetchval(sql.tables_exist):
                    raise TopologyError(
                        f"msgbus's tables in schema {self._options.schema!r} do not exist (topology=verify)"
                    )
                return
            async with conn.transaction():
                await conn.execute(f"SELECT pg_advisory_xact_lock({SETUP_LOCK})")
                await conn.execute(sql.create)

        await self.run("create msgbus's tables", setup)
        self._tables = True

    async def ping(self) -> None:
        """``SELECT 1`` on a pooled connection."""
        pool = self._pool
        if pool is None:
            raise ClosedError(f"{self!r} is not open")
        with translated("ping", self._options.secrets):
            await pool.fetchval("SELECT 1", timeout=self._options.command_timeout)

    async def declare(self, endpoint: Endpoint, *, create: bool = True) -> None:
        """Create the endpoint, its topic and its dead-letter destination (idempotent, across processes)."""
        _check_endpoint(endpoint)
        await self._ensure_tables(create)
        keys = _rows_to_create(endpoint)
        sql = self._sql
        if create:
            columns = [list(c) for c in zip(*keys, strict=True)]
            await self.run(f"declare {endpoint}", lambda c: c.execute(sql.add_endpoints, *columns))
            return
        for key in keys:
            await self._endpoint_id(key, create=False, what=endpoint)

    async def delete(self, endpoint: Endpoint) -> None:
        """Delete the queue's endpoint rows and its messages and dead letters in one statement, the name passed as
        a parameter; a missing queue (or no tables at all) deletes nothing."""
        name = deleted_queue(endpoint)
        if "\x00" in name:
            raise ConfigError(f"{endpoint}: a PostgreSQL text cannot hold a NUL character")
        try:
            await self._ensure_tables(False)
        except TopologyError:
            return
        for key in _rows_to_create(endpoint):
            self._ids.pop(key, None)
        sql = self._sql
        await self.run(f"delete {endpoint}", lambda c: c.execute(sql.delete_queue, name))

    async def _endpoint_id(self, key: tuple[str, str, str, bool], *, create: bool, what: Endpoint) -> int:
        found = self._ids.get(key)
        if found is not None:
            return found
        sql = self._sql

        async def lookup(conn: Any) -> int | None:
            value = await conn.fetchval(sql.find_endpoint, *key)
            if value is None and create:
                await conn.execute(sql.add_endpoints, [key[0]], [key[1]], [key[2]], [key[3]])
                value = await conn.fetchval(sql.find_endpoint, *key)
            return None if value is None else int(value)

        found = await self.run(f"look up {what}", lookup)
        if found is None:
            raise TopologyError(f"{what} does not exist (topology=verify)")
        self._ids[key] = found
        return found

    async def stats(self, endpoint: Endpoint) -> Mapping[str, float]:
        """Counted in the tables: waiting rows, rows leased now (in flight), dead letters, and the age of the
        oldest row's send time. Consumers are not registered anywhere, so there is no count of them."""
        _check_endpoint(endpoint)
        live = Endpoint(endpoint.kind, endpoint.name, endpoint.subscription)
        if live.kind == "topic" and live.subscription is None:
            raise ConfigError(f"{endpoint} holds no messages of its own: ask for a queue or a TOPIC/SUBSCRIPTION")
        await self._ensure_tables(False)
        dead = replace(live, dead_letter=True)
        ids = [await self._endpoint_id(_key(e), create=False, what=e) for e in (live, dead)]
        sql = self._sql
        total, held, dead_n, age = await self.run(f"stats of {endpoint}", lambda c: c.fetchrow(sql.stats, *ids))
        found = {"depth": total - held, "in_flight": held, "dead_letters": dead_n}
        if age is not None:
            found["oldest_age"] = max(0.0, age)
        return found

    # -- sending ------------------------------------------------------------------------------------

    async def send(self, endpoint: Endpoint, records: Sequence[Record], delay: float | None = None) -> None:
        """Insert ``records`` (one row per queue, or per current subscription of a topic) and NOTIFY; returns
        after the commit. Nothing is stored when a record is refused."""
        _check_endpoint(endpoint)
        limit = self._options.max_message_size
        rows = []
        for record in records:
            size = record.size()
            if size > limit:
                raise MessageTooLarge(size, limit)
            rows.append(encode(record))
        if not rows:
            return
        keys, bodies, metas = (list(c) for c in zip(*rows, strict=True))
        pause = max(delay or 0.0, 0.0)
        sql = self._sql
        target: str | int
        if endpoint.kind == "topic":
            await self._ensure_tables(True)
            statement, target = sql.insert_topic, endpoint.name
        else:
            statement, target = sql.insert_queue, await self._endpoint_id(_key(endpoint), create=True, what=endpoint)
        await self.run(
            f"send to {endpoint}", lambda c: c.execute(statement, target, pause, keys, bodies, metas), publish=True
        )

    # -- receiving ----------------------------------------------------------------------------------

    async def receiver(self, endpoint: Endpoint, prefetch: int) -> PostgresReceiver:
        """A receiver for a queue, a subscription or a dead-letter destination (created if missing)."""
        _check_endpoint(endpoint)
        if endpoint.kind == "topic" and endpoint.subscription is None:
            raise ConfigError(f"cannot receive from {endpoint} without a subscription name")
        await self._ensure_tables(True)
        dlq = Endpoint(endpoint.kind, endpoint.name, endpoint.subscription, dead_letter=True)
        endpoint_id = await self._endpoint_id(_key(endpoint), create=True, what=endpoint)
        dlq_id = await self._endpoint_id(_key(dlq), create=True, what=dlq)
        return PostgresReceiver(self, endpoint, endpoint_id, dlq_id)


def _key(endpoint: Endpoint) -> tuple[str, str, str, bool]:
    return (endpoint.kind, endpoint.name, endpoint.subscription or "", endpoint.dead_letter)


def _rows_to_create(endpoint: Endpoint) -> list[tuple[str, str, str, bool]]:
    """The endpoint rows ``declare`` makes: the endpoint, its parent topic, and its dead-letter destination."""
    if endpoint.kind == "queue":
        return [("queue", endpoint.name, "", False), ("queue", endpoint.name, "", True)]
    rows = [("topic", endpoint.name, "", False)]
    if endpoint.subscription is not None:
        rows += [
            ("topic", endpoint.name, endpoint.subscription, False),
            ("topic", endpoint.name, endpoint.subscription, True),
        ]
    return rows


def _check_endpoint(endpoint: Endpoint) -> None:
    if endpoint.kind not in ("queue", "topic"):
        raise ConfigError(f"unknown endpoint kind {endpoint.kind!r}")
    if not endpoint.name or endpoint.subscription == "":
        raise ConfigError("queue, topic and subscription names must not be empty")
    if endpoint.kind == "queue" and endpoint.subscription is not None:
        raise ConfigError(f"queue {endpoint.name!r} cannot have a subscription")
    if endpoint.kind == "topic" and endpoint.dead_letter and endpoint.subscription is None:
        raise ConfigError(f"dead letters belong to a subscription of topic {endpoint.name!r}, name one")
