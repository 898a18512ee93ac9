"""Transactional outbox: stage messages in the service's own database transaction; a relay forwards them.

``stage`` (asyncpg or psycopg async connections) and ``stage_sync`` (sqlite3 or psycopg connections) insert a
message into the outbox table inside the caller's transaction, so it exists exactly when the caller's own rows
commit. ``Relay`` (or ``msgbus relay --from DB --to BUS``) forwards committed messages to any bus, in commit
order per key, at least once, with the id they were staged with; a message leaves the table only after the bus
stored it. See ``docs/outbox.md``. Drivers are imported lazily: the core keeps no dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from . import _codec
from ._bus import Bus, _check_headers, _check_name, _opt_str, new_id
from ._message import Outgoing
from ._url import parse_url
from ._waits import wait_set
from .errors import BrokerError, ConfigError, InvalidMessage, MsgbusError

__all__ = ["TABLE", "Relay", "Staged", "create_table", "create_table_sync", "stage", "stage_sync"]

log = logging.getLogger("msgbus.outbox")

TABLE = "msgbus_outbox"
_TABLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}(\.[a-z_][a-z0-9_]{0,47})?$")

_POSTGRES_DDL = """
CREATE TABLE IF NOT EXISTS {t} (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    destination text NOT NULL,
    body bytea NOT NULL,
    meta bytea NOT NULL,
    staged_at timestamptz NOT NULL DEFAULT now(),
    error text
)"""
_SQLITE_DDL = """
CREATE TABLE IF NOT EXISTS {t} (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    body BLOB NOT NULL,
    meta BLOB NOT NULL,
    staged_at REAL NOT NULL,
    error TEXT
)"""


@dataclass(frozen=True, slots=True)
class Staged:
    """One outbox row as the relay reads it."""

    seq: int
    destination: str  # "queue:NAME" or "topic:NAME"
    message: Outgoing


def _table(name: str) -> str:
    if not _TABLE_NAME.match(name):
        raise ConfigError(f"outbox table must be a lower-case identifier (optionally schema.table), got {name!r}")
    return name


def _row(
    queue: str | None,
    topic: str | None,
    body: object,
    key: str | None,
    headers: Mapping[str, str] | None,
    message_id: str | None,
    correlation_id: str | None,
    content_type: str | None,
) -> tuple[str, bytes, bytes, str, str | None]:
    """(destination, body, meta, message id, key): checked as a send would be, so the relay can forward it."""
    if (queue is None) == (topic is None):
        raise ConfigError("stage a message for exactly one of queue=... or topic=...")
    destination = (
        f"queue:{_check_name('queue', queue)}" if queue is not None else f"topic:{_check_name('topic', topic)}"
    )
    payload, ctype = _codec.encode(body, _opt_str("content_type", content_type))
    msg_id = _opt_str("message_id", message_id) or new_id()
    meta = [
        msg_id,
        dict(_check_headers(headers)),
        _opt_str("key", key),
        _opt_str("correlation_id", correlation_id),
        ctype,
    ]
    try:
        encoded = json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError as exc:
        raise InvalidMessage(f"message {msg_id!r} has a string that is not valid UTF-8: {exc.reason}") from None
    return destination, payload, encoded, msg_id, key


def _key_lock(table: str, key: str) -> int:
    """The advisory lock id of ``key`` in ``table``: transactions staging one key commit one after another."""
    digest = hashlib.blake2b(f"{table}\0{key}".encode(errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# Taken per key by stage(): the second transaction staging a key waits until the first one ends.
_KEY_LOCK_SQL = "SELECT pg_advisory_xact_lock($1)"


def _channel(table: str) -> str:
    return "msgbus_outbox_" + table.replace(".", "_")


def _insert_sql(table: str) -> str:
    return (
        f"WITH s AS (INSERT INTO {table} (destination, body, meta) VALUES ($1, $2, $3) RETURNING seq)"
        f" SELECT pg_notify('{_channel(table)}', '') FROM s"
    )


def _psycopg(sql: str) -> str:
    """``$n`` placeholders (asyncpg's) as psycopg's ``%s`` (the parameters are passed in order)."""
    return re.sub(r"\$\d+", "%s", sql)


def _driver(conn: object) -> str:
    return type(conn).__module__.split(".")[0]


def _check_psycopg_transaction(conn: Any) -> None:
    # Without autocommit psycopg always runs inside a transaction (it begins one before the first statement).
    if conn.autocommit and conn.info.transaction_status != 2:  # psycopg.pq.TransactionStatus.INTRANS
        raise ConfigError("outbox.stage() must run inside the transaction that writes your own rows")


async def stage(
    conn: Any,
    body: object,
    *,
    queue: str | None = None,
    topic: str | None = None,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    message_id: str | None = None,
    correlation_id: str | None = None,
    content_type: str | None = None,
    table: str = TABLE,
) -> str:
    """Stage a message in the caller's open transaction on ``conn``; returns its id.

    ``conn`` is an asyncpg connection or a psycopg ``AsyncConnection`` (PostgreSQL). The message is forwarded
    once the transaction commits, and never if it rolls back. Staging a ``key`` takes a transaction-scoped
    advisory lock on it, so two transactions staging the same key commit one after the other and the relay
    forwards them in that order. Raises ``ConfigError`` outside a transaction.
    """
    t = _table(table)
    destination, payload, meta, msg_id, msg_key = _row(
        queue, topic, body, key, headers, message_id, correlation_id, content_type
    )
    driver = _driver(conn)
    if driver == "asyncpg":
        if not conn.is_in_transaction():
            raise ConfigError("outbox.stage() must run inside the transaction that writes your own rows")
        if msg_key is not None:
            await conn.execute(_KEY_LOCK_SQL, _key_lock(t, msg_key))
        await conn.execute(_insert_sql(t), destination, payload, meta)
    elif driver == "psycopg":
        _check_psycopg_transaction(conn)
        if msg_key is not None:
            await conn.execute(_psycopg(_KEY_LOCK_SQL), (_key_lock(t, msg_key),))
        await conn.execute(_psycopg(_insert_sql(t)), (destination, payload, meta))
    else:
        raise ConfigError(
            f"outbox.stage() takes an asyncpg or psycopg async connection, not {type(conn).__name__}"
            " (stage_sync() takes sqlite3 and psycopg connections)"
        )
    return msg_id


def stage_sync(
    conn: Any,
    body: object,
    *,
    queue: str | None = None,
    topic: str | None = None,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    message_id: str | None = None,
    correlation_id: str | None = None,
    content_type: str | None = None,
    table: str = TABLE,
) -> str:
    """Stage a message in the current transaction of a ``sqlite3`` or psycopg (sync) connection; returns its id.

    The row commits (or rolls back) with the caller's transaction. SQLite runs one write transaction at a time,
    so its outbox order is commit order; on PostgreSQL a ``key`` is locked as ``stage`` does.
    """
    t = _table(table)
    destination, payload, meta, msg_id, msg_key = _row(
        queue, topic, body, key, headers, message_id, correlation_id, content_type
    )
    if isinstance(conn, sqlite3.Connection):
        conn.execute(
            f"INSERT INTO {t} (destination, body, meta, staged_at) VALUES (?, ?, ?, ?)",
            (destination, payload, meta, time.time()),
        )
    elif _driver(conn) == "psycopg":
        _check_psycopg_transaction(conn)
        if msg_key is not None:
            conn.execute(_psycopg(_KEY_LOCK_SQL), (_key_lock(t, msg_key),))
        conn.execute(_psycopg(_insert_sql(t)), (destination, payload, meta))
    else:
        raise ConfigError(f"outbox.stage_sync() takes a sqlite3 or psycopg connection, not {type(conn).__name__}")
    return msg_id


async def create_table(conn: Any, table: str = TABLE) -> None:
    """Create the outbox table on an asyncpg or psycopg async connection if missing (the relay does this too)."""
    await conn.execute(_POSTGRES_DDL.format(t=_table(table)))


def create_table_sync(conn: Any, table: str = TABLE) -> None:
    """Create the outbox table on a sqlite3 or psycopg connection if it does not exist."""
    ddl = _SQLITE_DDL if isinstance(conn, sqlite3.Connection) else _POSTGRES_DDL
    conn.execute(ddl.format(t=_table(table)))


def _outgoing(body: bytes, meta: bytes) -> Outgoing:
    msg_id, headers, key, correlation_id, content_type = json.loads(meta)
    return Outgoing(
        body, key=key, headers=headers, message_id=msg_id, correlation_id=correlation_id, content_type=content_type
    )


# -- the relay ----------------------------------------------------------------------------------------------


class _Source(Protocol):
    """An outbox table the relay drains: one relay at a time holds it."""

    async def open(self, stop: asyncio.Event) -> bool:
        """Connect and become the table's one forwarder; False when ``stop`` was set while waiting for that."""
        ...

    async def take(self, limit: int) -> list[tuple[int, str, bytes, bytes]]: ...

    async def remove(self, seqs: Sequence[int]) -> None: ...

    async def park(self, seq: int, error: str) -> None: ...

    async def wait(self, seconds: float) -> None: ...

    async def close(self) -> None: ...


class _PostgresSource:
    """An outbox table in PostgreSQL; a session advisory lock makes one relay the forwarder, NOTIFY wakes it.

    asyncpg's errors leave it as ``BrokerError`` (the relay reconnects), through ``_guard``.
    """

    def __init__(self, url: str, table: str) -> None:
        self._url = url
        self._table = table
        self._conn: Any = None
        self._woken = asyncio.Event()
        self._errors: tuple[type[BaseException], ...] = ()

    @contextlib.contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            raise BrokerError(f"outbox: {doing} failed: {type(exc).__name__}: {exc}") from exc

    async def open(self, stop: asyncio.Event) -> bool:
        try:
            import asyncpg
        except ImportError as exc:
            raise ConfigError(
                "the outbox relay from postgresql:// needs asyncpg: pip install msgbus-postgresql"
            ) from exc
        self._errors = (asyncpg.PostgresError, asyncpg.InterfaceError)
        parsed = parse_url(self._url)
        with self._guard("connect"):
            conn = await asyncpg.connect(
                host=parsed.host or "127.0.0.1",
                port=parsed.port or 5432,
                user=parsed.username,
                password=parsed.password,
                database=parsed.path.lstrip("/") or None,
                timeout=10,
                command_timeout=30,
                server_settings={"application_name": "msgbus-relay"},
            )
        try:
            await conn.execute(_POSTGRES_DDL.format(t=self._table))
            lock = _key_lock(self._table, "\0relay")
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock):
                log.info("outbox: another relay forwards %s; waiting to take over", self._table)
                await wait_set(stop, 1.0)
                if stop.is_set():
                    conn.terminate()
                    return False
            await conn.add_listener(_channel(self._table), lambda *_: self._woken.set())
        except self._errors as exc:
            conn.terminate()
            raise BrokerError(f"outbox: opening {self._table} failed: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        return True

    async def take(self, limit: int) -> list[tuple[int, str, bytes, bytes]]:
        self._woken.clear()
        with self._guard("reading the outbox"):
            rows = await self._conn.fetch(
                f"SELECT seq, destination, body, meta FROM {self._table} WHERE error IS NULL ORDER BY seq LIMIT $1",
                limit,
            )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def remove(self, seqs: Sequence[int]) -> None:
        with self._guard("removing forwarded rows"):
            await self._conn.execute(f"DELETE FROM {self._table} WHERE seq = ANY($1::bigint[])", list(seqs))

    async def park(self, seq: int, error: str) -> None:
        with self._guard("parking a refused row"):
            await self._conn.execute(f"UPDATE {self._table} SET error = $2 WHERE seq = $1", seq, error)

    async def wait(self, seconds: float) -> None:
        await wait_set(self._woken, seconds)
        with self._guard("pinging the database"):
            await self._conn.fetchval("SELECT 1")  # a dead connection surfaces here, not as a silent wait

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await conn.close()
            conn.terminate()


class _SqliteSource:
    """An outbox table in a SQLite file; an flock on ``<file>.relay`` makes one relay the forwarder."""

    def __init__(self, path: str, table: str) -> None:
        self._path = path
        self._table = table
        self._conn: sqlite3.Connection | None = None
        self._lock_file: Any = None

    async def open(self, stop: asyncio.Event) -> bool:
        handle = await asyncio.to_thread(open, f"{self._path}.relay", "a")  # held open for the relay's life
        self._lock_file = handle
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                log.info("outbox: another relay forwards %s; waiting to take over", self._path)
                await wait_set(stop, 1.0)
                if stop.is_set():
                    return False
        conn = sqlite3.connect(self._path, timeout=10, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(_SQLITE_DDL.format(t=self._table))
        self._conn = conn
        return True

    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    async def take(self, limit: int) -> list[tuple[int, str, bytes, bytes]]:
        sql = f"SELECT seq, destination, body, meta FROM {self._table} WHERE error IS NULL ORDER BY seq LIMIT ?"
        rows = await asyncio.to_thread(lambda: self._db().execute(sql, (limit,)).fetchall())
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def remove(self, seqs: Sequence[int]) -> None:
        sql = f"DELETE FROM {self._table} WHERE seq = ?"
        await asyncio.to_thread(lambda: self._db().executemany(sql, [(s,) for s in seqs]))

    async def park(self, seq: int, error: str) -> None:
        await asyncio.to_thread(
            lambda: self._db().execute(f"UPDATE {self._table} SET error = ? WHERE seq = ?", (error, seq))
        )

    async def wait(self, seconds: float) -> None:
        await asyncio.sleep(seconds)  # SQLite has no notifications: poll

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


def _source(url: str, table: str) -> _Source:
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("postgresql", "postgres"):
        return _PostgresSource(url, table)
    if scheme == "sqlite":
        from ._sqlite import database_path

        return _SqliteSource(database_path(parse_url(url)), table)
    raise ConfigError(f"the outbox relay reads postgresql:// or sqlite:/// databases, not {scheme}://")


class Relay:
    """Forwards staged messages from a database's outbox table to a bus: at least once, in commit order per key.

    A row is deleted only after the bus stored it (``send`` returned), so a relay killed at any point resends
    at most the batch it was forwarding, with the same message ids. Several relays may run: one forwards, the
    others wait to take over. A message the bus refuses as invalid (too large for it, say) is parked in the
    table with the reason (``error`` column) instead of blocking the rest.
    """

    def __init__(
        self, source: str, target: str | Bus, *, table: str = TABLE, batch: int = 100, poll_interval: float = 1.0
    ) -> None:
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        self._table = _table(table)
        self._source_url = source
        self._target = target
        self._batch = batch
        self._poll = poll_interval
        self.forwarded = 0
        self.parked = 0

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Forward until ``stop`` is set (or the task is cancelled), riding out database and broker outages.

        A relay waiting for another to let go of the table stops waiting when ``stop`` is set.
        """
        stop = stop or asyncio.Event()
        owned = not isinstance(self._target, Bus)
        bus = _connect(self._target) if isinstance(self._target, str) else self._target
        pause = 0.1
        try:
            while not stop.is_set():
                source = _source(self._source_url, self._table)
                try:
                    await bus.open()  # idempotent; retried here while the broker is unreachable
                    if not await source.open(stop):
                        return
                    while not stop.is_set():
                        moved = await self._forward(source, bus)
                        pause = 0.1
                        if moved < self._batch:
                            await source.wait(self._poll)
                except (MsgbusError, OSError, TimeoutError, sqlite3.Error) as exc:
                    log.warning("outbox: relay interrupted (%s: %s); retrying in %.1fs", type(exc).__name__, exc, pause)
                finally:
                    await source.close()
                if not stop.is_set():
                    await wait_set(stop, pause)
                    pause = min(pause * 2, 5.0)
        finally:
            if owned:
                await bus.close()

    async def forward_once(self) -> int:
        """Forward what is staged now (up to one batch); returns how many left the table."""
        bus = self._target if isinstance(self._target, Bus) else _connect(self._target)
        source = _source(self._source_url, self._table)
        await source.open(asyncio.Event())
        try:
            if isinstance(self._target, Bus):
                return await self._forward(source, bus)
            async with bus:
                return await self._forward(source, bus)
        finally:
            await source.close()

    async def _forward(self, source: _Source, bus: Bus) -> int:
        rows = await source.take(self._batch)
        if not rows:
            return 0
        done: list[int] = []
        # Consecutive rows for one destination go out as one batch; batches go out one after another.
        start = 0
        while start < len(rows):
            end = start
            while end < len(rows) and rows[end][1] == rows[start][1]:
                end += 1
            group = rows[start:end]
            done += await self._send(source, bus, group)
            start = end
        await source.remove(done)
        self.forwarded += len(done)
        return len(rows)

    async def _send(self, source: _Source, bus: Bus, group: Sequence[tuple[int, str, bytes, bytes]]) -> list[int]:
        """Send one destination's rows in order; the seqs that can leave the table (refused ones are parked)."""
        kind, _, name = group[0][1].partition(":")
        sender = bus.publisher(name) if kind == "topic" else bus.producer(name)
        send_many = sender.publish_many if kind == "topic" else sender.send_many  # type: ignore[union-attr]
        try:
            await send_many([_outgoing(body, meta) for _, _, body, meta in group])
            return [seq for seq, *_ in group]
        except InvalidMessage:
            pass
        out: list[int] = []
        for row in group:  # find the refused one(s); the others go out one by one, still in order
            try:
                await send_many([_outgoing(row[2], row[3])])
                out.append(row[0])
            except InvalidMessage as exc:
                log.error("outbox: %s refused message %d for good; parked: %s", bus.url, row[0], exc)
                await source.park(row[0], f"{type(exc).__name__}: {exc}")
                self.parked += 1
        return out


def _connect(url: str) -> Bus:
    from . import connect  # the package's own entry point, defined after its submodules are imported

    return connect(url)
