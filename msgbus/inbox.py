"""Idempotent inbox: middleware that runs a handler at most once per message id.

The processed id is recorded in the service's own store in the same transaction as the handler's writes
(``inbox.connection()`` inside the handler), so a redelivery after a crash finds the id and is acked without
running the handler again, and a handler that failed left neither its writes nor the id behind::

    inbox = PostgresInbox(pool, name="billing")
    async def handle(msg):
        await inbox.connection().execute("INSERT INTO payments ...")
    await consumer.run(handle, middleware=[inbox])

Stores: PostgreSQL (an asyncpg pool), SQLite (a file or a sqlite3 connection), Redis (a redis.asyncio
client; there the handler's Redis commands queue on ``inbox.connection()``, a MULTI pipeline). Ids are kept
for ``retention`` seconds: a copy redelivered later than that runs again. Drivers are imported lazily.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import re
import sqlite3
import time
from contextvars import ContextVar
from typing import Any

from ._message import Message
from ._runtime import Handler
from .errors import ConfigError

__all__ = ["TABLE", "Inbox", "PostgresInbox", "RedisInbox", "SqliteInbox"]

log = logging.getLogger("msgbus.inbox")

TABLE = "msgbus_inbox"
_TABLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}(\.[a-z_][a-z0-9_]{0,47})?$")


class Inbox(abc.ABC):
    """A middleware (``Handler -> Handler``) that records each handled message id with the handler's writes.

    ``name`` scopes the ids: services sharing one store each use their own. ``duplicates`` counts the
    deliveries acked without running the handler because their id was already recorded.
    """

    def __init__(self, *, name: str, table: str, retention: float) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError("an inbox needs a non-empty name")
        if not _TABLE_NAME.match(table):
            raise ConfigError(f"inbox table must be a lower-case identifier (optionally schema.table), got {table!r}")
        if retention <= 0:
            raise ConfigError(f"inbox retention must be > 0 seconds, got {retention}")
        self.name = name
        self.table = table
        self.retention = retention
        self.duplicates = 0
        self._current: ContextVar[Any] = ContextVar(f"msgbus-inbox-{name}")
        self._next_purge = 0.0

    def connection(self) -> Any:
        """Inside a handler: the store's connection whose transaction commits with the message id."""
        try:
            return self._current.get()
        except LookupError:
            raise RuntimeError("inbox.connection() is only available inside a handler wrapped by this inbox") from None

    def __call__(self, handler: Handler) -> Handler:
        async def at_most_once(msg: Message[Any]) -> None:
            ran = await self._once(msg.id, handler, msg)
            if not ran:
                self.duplicates += 1
                log.info(
                    "inbox %s: message %s was already processed; acked without running the handler", self.name, msg.id
                )
            now = time.monotonic()
            if now >= self._next_purge:
                self._next_purge = now + min(self.retention / 10, 60.0)
                await self._purge()

        return at_most_once

    @abc.abstractmethod
    async def _once(self, message_id: str, handler: Handler, msg: Message[Any]) -> bool:
        """Record ``message_id`` and run the handler in one transaction; False when it was recorded already."""

    @abc.abstractmethod
    async def _purge(self) -> None:
        """Forget ids recorded longer than ``retention`` ago."""

    def _run_with(self, conn: Any) -> Any:
        return self._current.set(conn)


def _id(message_id: str) -> bytes:
    # bytes, so any id (a NUL, any code point) fits the column
    return message_id.encode("utf-8", "surrogatepass")


class PostgresInbox(Inbox):
    """Ids in a PostgreSQL table, inserted in the handler's transaction on a connection from ``pool`` (asyncpg).

    A concurrent second delivery of one id (after a lease ran out) waits on the first one's row lock and is
    skipped once that commits, or runs if it rolled back.
    """

    def __init__(self, pool: Any, *, name: str = "default", table: str = TABLE, retention: float = 7 * 86400.0) -> None:
        super().__init__(name=name, table=table, retention=retention)
        self._pool = pool
        self._ready = False

    async def create_table(self) -> None:
        """Create the inbox table if missing (done on first use)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7170512389)")  # buses starting at once: one creates
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} (name text NOT NULL, message_id bytea NOT NULL,"
                " processed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (name, message_id))"
            )
        self._ready = True

    async def _once(self, message_id: str, handler: Handler, msg: Message[Any]) -> bool:
        if not self._ready:
            await self.create_table()
        async with self._pool.acquire() as conn, conn.transaction():
            fresh = await conn.fetchval(
                f"INSERT INTO {self.table} (name, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING true",
                self.name,
                _id(message_id),
            )
            if not fresh:
                return False
            token = self._run_with(conn)
            try:
                await handler(msg)
            finally:
                self._current.reset(token)
        return True

    async def _purge(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                f"DELETE FROM {self.table} WHERE name = $1 AND processed_at < now() - make_interval(secs => $2)",
                self.name,
                self.retention,
            )


class SqliteInbox(Inbox):
    """Ids in a SQLite table, in a ``BEGIN IMMEDIATE`` transaction that the handler writes through.

    SQLite has one writer at a time, so handlers wrapped by one SqliteInbox run one after another.
    ``database`` is a file path or a sqlite3 connection made with ``check_same_thread=False``.
    """

    def __init__(
        self,
        database: str | sqlite3.Connection,
        *,
        name: str = "default",
        table: str = TABLE,
        retention: float = 7 * 86400.0,
    ) -> None:
        super().__init__(name=name, table=table, retention=retention)
        if isinstance(database, sqlite3.Connection):
            self._conn = database
        else:
            self._conn = sqlite3.connect(database, timeout=30, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table} (name TEXT NOT NULL, message_id BLOB NOT NULL,"
            " processed_at REAL NOT NULL, PRIMARY KEY (name, message_id))"
        )
        if self._conn.in_transaction:
            self._conn.commit()
        self._lock = asyncio.Lock()

    async def _once(self, message_id: str, handler: Handler, msg: Message[Any]) -> bool:
        conn = self._conn
        async with self._lock:
            await asyncio.to_thread(conn.execute, "BEGIN IMMEDIATE")  # may wait for another process's writer
            try:
                cur = conn.execute(
                    f"INSERT OR IGNORE INTO {self.table} (name, message_id, processed_at) VALUES (?, ?, ?)",
                    (self.name, _id(message_id), time.time()),
                )
                if cur.rowcount == 0:
                    conn.rollback()
                    return False
                token = self._run_with(conn)
                try:
                    await handler(msg)
                finally:
                    self._current.reset(token)
            except BaseException:
                conn.rollback()
                raise
            await asyncio.to_thread(conn.commit)
        return True

    async def _purge(self) -> None:
        async with self._lock:
            sql = f"DELETE FROM {self.table} WHERE name = ? AND processed_at < ?"
            await asyncio.to_thread(self._conn.execute, sql, (self.name, time.time() - self.retention))
            if self._conn.in_transaction:
                await asyncio.to_thread(self._conn.commit)

    def close(self) -> None:
        """Close the connection this inbox opened (not one it was given)."""
        self._conn.close()


class RedisInbox(Inbox):
    """Ids as Redis keys ``msgbus-inbox:{name}:{id}`` that expire after ``retention``.

    The id is set in a MULTI/EXEC transaction watched from before the handler runs; the handler's Redis
    commands queue on ``inbox.connection()`` (that pipeline) and commit with it. Effects outside Redis are not
    in that transaction: a crash between them and EXEC runs the handler again on redelivery.
    """

    def __init__(self, client: Any, *, name: str = "default", retention: float = 7 * 86400.0) -> None:
        super().__init__(name=name, table=TABLE, retention=retention)
        self._client = client

    async def _once(self, message_id: str, handler: Handler, msg: Message[Any]) -> bool:
        from redis.exceptions import WatchError

        key = b"msgbus-inbox:" + self.name.encode() + b":" + _id(message_id)
        async with self._client.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            if await pipe.exists(key):
                return False
            pipe.multi()
            token = self._run_with(pipe)
            try:
                await handler(msg)
            finally:
                self._current.reset(token)
            pipe.set(key, b"1", px=int(self.retention * 1000))
            try:
                await pipe.execute()
            except WatchError:  # another delivery of this id committed first: its effects count, not ours
                return False
        return True

    async def _purge(self) -> None:
        """Redis expires the keys itself."""
