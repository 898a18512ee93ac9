"""The ``sqlite://`` embedded backend: a durable bus in one SQLite file, shared by processes on one host.

URL like SQLAlchemy: ``sqlite:///relative/path.db`` (relative to the working directory at ``connect``),
``sqlite:////absolute/path.db``. Options: ``visibility_timeout`` (seconds a received message stays
leased, default 30), ``poll_interval`` (longest idle pause between polls, default 0.05),
``synchronous`` (``normal`` | ``full``), ``busy_timeout`` (seconds to wait for another process's write
lock, default 10), ``max_message_size`` (bytes, default 1 MiB).

Durability: the database always runs in WAL mode and ``send`` returns only after its transaction
committed. With ``synchronous=normal`` (default) a committed message survives the crash or ``kill -9`` of
any process, but an OS crash or power loss may roll back the last few commits (never corrupting the file).
``synchronous=full`` syncs the WAL to disk on every commit, so committed messages also survive power loss.

Each receive leases rows for ``visibility_timeout`` with a fresh random token; a lease that is neither
settled nor extended expires and the message is delivered again with ``attempt + 1``. Every settlement is
guarded by the token, so a stale handle never touches a message that someone else has since leased.

All SQLite work of one adapter runs on its own thread with one connection. That thread drains every
pending operation (sends, receives, acks from any number of tasks) into one transaction and resolves their
futures after the commit: group commit is what makes durable throughput cheap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, NamedTuple, TypeVar

from ._capabilities import Capabilities
from ._url import BusURL, OptionReader
from .adapter import Adapter, Delivery, Endpoint, Receiver, Record, dead_letter_record, dedup_key, deleted_queue
from .errors import (
    BrokerError,
    ClosedError,
    ConfigError,
    ConnectionLost,
    MessageTooLarge,
    MsgbusError,
    TopologyError,
)

__all__ = ["SqliteAdapter", "SqliteMessage", "create"]

log = logging.getLogger("msgbus.sqlite")

T = TypeVar("T")

_SCHEMA_VERSION: Final = 1
_MAX_OPS_PER_COMMIT: Final = 512
_FIRST_POLL: Final = 0.001  # idle polling starts here and doubles up to poll_interval

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS msgbus_endpoints (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    subscription TEXT NOT NULL,
    dead_letter INTEGER NOT NULL,
    UNIQUE (kind, name, subscription, dead_letter)
);
CREATE TABLE IF NOT EXISTS msgbus_messages (
    seq INTEGER PRIMARY KEY,
    endpoint INTEGER NOT NULL,
    visible_at REAL NOT NULL,
    lease INTEGER,
    attempts INTEGER NOT NULL,
    id TEXT NOT NULL,
    body BLOB NOT NULL,
    headers TEXT NOT NULL,
    key TEXT,
    correlation_id TEXT,
    content_type TEXT,
    timestamp REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS msgbus_messages_ready ON msgbus_messages (endpoint, seq, visible_at);
CREATE INDEX IF NOT EXISTS msgbus_messages_key ON msgbus_messages (endpoint, key, seq) WHERE key IS NOT NULL;
CREATE TABLE IF NOT EXISTS msgbus_sent (
    endpoint INTEGER NOT NULL,
    key TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (endpoint, key)
) WITHOUT ROWID;
"""

# Send deduplication (``dedup_window``): a key sent to an endpoint, and until when a repeat of it is dropped.
_SENT: Final = "SELECT 1 FROM msgbus_sent WHERE endpoint = ? AND key = ? AND until > ?"
_REMEMBER: Final = (
    "INSERT INTO msgbus_sent (endpoint, key, until) VALUES (?, ?, ?)"
    " ON CONFLICT (endpoint, key) DO UPDATE SET until = excluded.until"
)
_INSERT: Final = (
    "INSERT INTO msgbus_messages (endpoint, visible_at, lease, attempts, id, body, headers, key,"
    " correlation_id, content_type, timestamp) VALUES (?, ?, NULL, 0, ?, ?, ?, ?, ?, ?, ?)"
)

# A row is deliverable when it is visible and no earlier row with its key is still present (per-key order).
_LEASE: Final = """
UPDATE msgbus_messages SET lease = :lease, visible_at = :until, attempts = attempts + 1
WHERE seq IN (
    SELECT m.seq FROM msgbus_messages AS m
    WHERE m.endpoint = :endpoint AND m.visible_at <= :now
      AND (m.key IS NULL OR NOT EXISTS (
          SELECT 1 FROM msgbus_messages AS e
          WHERE e.endpoint = m.endpoint AND e.key = m.key AND e.seq < m.seq))
    ORDER BY m.seq LIMIT :limit)
RETURNING seq, attempts, id, body, headers, key, correlation_id, content_type, timestamp
"""

_Row = tuple[Any, ...]
_EndpointKey = tuple[str, str, str, int]


# ---------------------------------------------------------------------------------------------------------
# Error translation: the one place where sqlite3 exceptions become msgbus errors.


def _translate(exc: BaseException, path: str) -> BaseException:
    """The msgbus error for ``exc`` (with ``exc`` as its cause); msgbus errors and BaseExceptions pass through.

    Anything else that is not a ``sqlite3.Error`` (a value the driver cannot bind, say) is a non-retryable
    ``BrokerError``: the adapter's methods raise msgbus errors only.
    """
    if isinstance(exc, MsgbusError) or not isinstance(exc, Exception):
        return exc
    if not isinstance(exc, sqlite3.Error):
        unexpected = BrokerError(f"sqlite operation on {path} failed: {type(exc).__name__}: {exc}"[:500])
        unexpected.retryable = False
        unexpected.__cause__ = exc
        return unexpected
    code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
    err: MsgbusError
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        err = BrokerError(f"sqlite database {path} stayed locked by another process (raise busy_timeout?)")
    elif code == sqlite3.SQLITE_NOTADB:
        err = ConfigError(f"{path} is not a SQLite database")
    elif code == sqlite3.SQLITE_CANTOPEN:
        err = ConnectionLost(f"cannot open sqlite database {path}: {exc}")
    elif code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH):
        err = ConnectionLost(f"sqlite database {path} is not writable: {exc}")
    elif code == sqlite3.SQLITE_FULL:
        err = BrokerError(f"disk full writing sqlite database {path}")
    else:
        err = BrokerError(f"sqlite error on {path}: {exc}")
    err.__cause__ = exc
    return err


def _is_busy(exc: sqlite3.Error) -> bool:
    code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


# ---------------------------------------------------------------------------------------------------------
# The database side: runs only on the adapter's thread.


def _key(endpoint: Endpoint) -> _EndpointKey:
    return (endpoint.kind, endpoint.name, endpoint.subscription or "", int(endpoint.dead_letter))


def _rows_to_create(endpoint: Endpoint) -> list[_EndpointKey]:
    """The endpoint rows ``declare`` makes: the endpoint, its parent topic, and its dead-letter destination."""
    if endpoint.kind == "queue":
        return [("queue", endpoint.name, "", 0), ("queue", endpoint.name, "", 1)]
    rows: list[_EndpointKey] = [("topic", endpoint.name, "", 0)]
    if endpoint.subscription is not None:
        rows += [("topic", endpoint.name, endpoint.subscription, 0), ("topic", endpoint.name, endpoint.subscription, 1)]
    return rows


class _Store:
    """One SQLite connection and the statements of the bus.

    Methods raise msgbus errors only before they write, so a failed operation needs no rollback of its own.
    """

    def __init__(self, path: str, synchronous: str, busy_timeout: float) -> None:
        self.conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, cached_statements=64)
        self._ids: dict[_EndpointKey, int] = {}
        self._sends = 0  # deduplicated sends, for pruning ``msgbus_sent``
        try:
            mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigError(f"sqlite database {path} cannot use WAL mode (journal_mode is {mode})")
            self.conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            # A busy bus can grow the WAL while two processes keep it in use; shrink it back on each reset.
            self.conn.execute("PRAGMA journal_size_limit = 67108864")
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                version = self.conn.execute("PRAGMA user_version").fetchone()[0]
                if version > _SCHEMA_VERSION:
                    raise ConfigError(f"sqlite database {path} was made by a newer msgbus (schema {version})")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        except BaseException:
            self.conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def endpoint_id(self, endpoint: Endpoint, *, create: bool) -> int:
        """The row id of ``endpoint`` (ids never change), declaring it first when missing and ``create``."""
        key = _key(endpoint)
        found = self._ids.get(key)
        if found is None:
            found = self._lookup(key)
            if found is None:
                if not create:
                    raise TopologyError(f"{endpoint} does not exist (topology=verify)")
                self.declare(endpoint, create=True)
                found = self._lookup(key)
                assert found is not None
            self._ids[key] = found
        return found

    def _lookup(self, key: _EndpointKey) -> int | None:
        row = self.conn.execute(
            "SELECT id FROM msgbus_endpoints WHERE kind = ? AND name = ? AND subscription = ? AND dead_letter = ?",
            key,
        ).fetchone()
        return None if row is None else int(row[0])

    def declare(self, endpoint: Endpoint, create: bool) -> None:
        rows = _rows_to_create(endpoint)
        if create:
            self.conn.executemany(
                "INSERT OR IGNORE INTO msgbus_endpoints (kind, name, subscription, dead_letter) VALUES (?, ?, ?, ?)",
                rows,
            )
            return
        for key in rows:
            if key not in self._ids and self._lookup(key) is None:
                raise TopologyError(f"{endpoint} does not exist (topology=verify)")

    def delete(self, name: str) -> None:
        """Delete queue ``name`` and its dead letters, with their messages; a missing queue is fine."""
        keys = _rows_to_create(Endpoint("queue", name))
        ids = [(found,) for key in keys if (found := self._lookup(key)) is not None]
        for key in keys:
            self._ids.pop(key, None)
        self.conn.executemany("DELETE FROM msgbus_messages WHERE endpoint = ?", ids)
        # Tombstones, not gaps: SQLite gives a new row the highest id + 1, and a process that still has a deleted
        # id cached (a responder sending a late reply) must not write into the next queue declared. Only the
        # highest tombstone needs to stay; a late write to an older one is left to no endpoint, unread.
        self.conn.executemany("UPDATE msgbus_endpoints SET kind = 'deleted', name = CAST(id AS TEXT) WHERE id = ?", ids)
        self.conn.execute(
            "DELETE FROM msgbus_messages WHERE endpoint IN (SELECT id FROM msgbus_endpoints WHERE kind = 'deleted')"
        )
        self.conn.execute(
            "DELETE FROM msgbus_endpoints WHERE kind = 'deleted' AND id < (SELECT max(id) FROM msgbus_endpoints)"
        )

    def targets(self, endpoint: Endpoint) -> list[int]:
        """Endpoint ids a send lands in: one queue, or every current subscription of a topic (maybe none).

        A queue or topic that does not exist yet is created, as the memory backend does.
        """
        if endpoint.kind == "topic" and endpoint.subscription is None:
            self.endpoint_id(endpoint, create=True)
            rows = self.conn.execute(
                "SELECT id FROM msgbus_endpoints WHERE kind = 'topic' AND name = ? AND subscription != ''"
                " AND dead_letter = 0",
                (endpoint.name,),
            ).fetchall()
            return [int(r[0]) for r in rows]
        return [self.endpoint_id(endpoint, create=True)]

    def send(
        self, endpoint: Endpoint, rows: Sequence[_Row], visible_at: float, dedup: tuple[list[str], float, float] | None
    ) -> list[int]:
        """Insert ``rows`` at each target; with ``dedup`` = (each row's ``dedup_key``, now, window), not those whose
        key was sent to that target within its window (``msgbus_sent``, pruned of expired keys every 1000 sends)."""
        targets = self.targets(endpoint)
        if dedup is None:
            self.conn.executemany(_INSERT, [(t, visible_at, *row) for t in targets for row in rows])
            return targets
        keys, now, window = dedup
        self._sends += 1
        if self._sends % 1000 == 0:
            self.conn.execute("DELETE FROM msgbus_sent WHERE until <= ?", (now,))
        for t in targets:
            seen = {k for k in keys if self.conn.execute(_SENT, (t, k, now)).fetchone() is not None}
            fresh: list[_Row] = []
            remembered: list[tuple[int, str, float]] = []
            for key, row in zip(keys, rows, strict=True):
                if key not in seen:
                    seen.add(key)  # a repeat within the batch too
                    fresh.append(row)
                    remembered.append((t, key, now + window))  # the window runs from the first send, as on SQS
            self.conn.executemany(_INSERT, [(t, visible_at, *row) for row in fresh])
            self.conn.executemany(_REMEMBER, remembered)
        return targets

    def lease(self, endpoint_id: int, limit: int, lease: int, now: float, until: float) -> list[_Row]:
        params = {"lease": lease, "until": until, "endpoint": endpoint_id, "now": now, "limit": limit}
        rows = self.conn.execute(_LEASE, params).fetchall()
        rows.sort(key=lambda r: r[0])
        return rows

    def ack(self, held: Iterable[tuple[int, int]]) -> int:
        cur = self.conn.executemany("DELETE FROM msgbus_messages WHERE seq = ? AND lease = ?", held)
        return cur.rowcount

    def nack(self, seq: int, lease: int, visible_at: float) -> int:
        cur = self.conn.execute(
            "UPDATE msgbus_messages SET lease = NULL, visible_at = ? WHERE seq = ? AND lease = ?",
            (visible_at, seq, lease),
        )
        return cur.rowcount

    def release(self, held: Iterable[tuple[int, int]], now: float) -> int:
        """(seq, lease) rows back, visible now, their lease's count taken back: nobody saw them."""
        cur = self.conn.executemany(
            "UPDATE msgbus_messages SET lease = NULL, visible_at = ?, attempts = attempts - 1"
            " WHERE seq = ? AND lease = ?",
            [(now, seq, lease) for seq, lease in held],
        )
        return cur.rowcount

    def extend(self, seq: int, lease: int, until: float) -> int:
        cur = self.conn.execute(
            "UPDATE msgbus_messages SET visible_at = ? WHERE seq = ? AND lease = ?", (until, seq, lease)
        )
        return cur.rowcount

    def dead_letter(self, seq: int, lease: int, dlq_id: int, row: _Row, now: float) -> int:
        cur = self.conn.execute("DELETE FROM msgbus_messages WHERE seq = ? AND lease = ?", (seq, lease))
        if cur.rowcount:
            self.conn.execute(_INSERT, (dlq_id, now, *row))
        return cur.rowcount


def _encode(record: Record) -> _Row:
    headers = json.dumps(dict(record.headers), separators=(",", ":"), ensure_ascii=False)
    return (
        record.id,
        record.body,
        headers,
        record.key,
        record.correlation_id,
        record.content_type,
        record.timestamp,
    )


def _decode(row: _Row) -> Record:
    """A ``Record`` from a leased row (seq, attempts, id, body, headers, key, correlation_id, content_type, ts)."""
    headers = row[4]
    return Record(
        body=row[3],
        id=row[2],
        headers={} if headers == "{}" else json.loads(headers),
        key=row[5],
        correlation_id=row[6],
        content_type=row[7],
        timestamp=row[8],
    )


# An operation run on the database thread: gets the store and the batch's clock, returns its result and
# the endpoint ids whose deliverable messages may have changed (their waiting receivers are woken).
_OpFn = Callable[[_Store, float], tuple[T, Iterable[int]]]


@dataclass(slots=True)
class _Op:
    fn: _OpFn[Any]
    future: concurrent.futures.Future[Any]


class _DbThread:
    """The adapter's database thread: one connection, operations grouped into one transaction per batch."""

    def __init__(self, path: str, synchronous: str, busy_timeout: float, on_commit: Callable[[set[int]], None]) -> None:
        self._path = path
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._on_commit = on_commit
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.stopped: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, name=f"msgbus-sqlite:{path}", daemon=True)
        self._thread.start()

    def submit(self, fn: _OpFn[T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._ops.put(_Op(fn, future))
        return future

    def stop(self) -> None:
        """Finish the operations already submitted, then close the connection (``stopped`` resolves)."""
        self._ops.put(None)

    def _main(self) -> None:
        try:
            try:
                store = self._open()
            except BaseException as exc:
                self.ready.set_exception(_translate(exc, self._path))
                self._drain(ClosedError("sqlite adapter failed to open"))
                return
            self.ready.set_result(None)
            try:
                self._serve(store)
            finally:
                store.close()
                self._drain(ClosedError("sqlite adapter is closed"))
        finally:
            self.stopped.set_result(None)

    def _open(self) -> _Store:
        parent = os.path.dirname(self._path) or "."
        if not os.path.isdir(parent):
            raise ConfigError(f"directory {parent} for sqlite database {self._path} does not exist")
        for attempt in range(50):
            try:
                return _Store(self._path, self._synchronous, self._busy_timeout)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or attempt == 49:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _serve(self, store: _Store) -> None:
        while True:
            item = self._ops.get()
            batch: list[_Op] = []
            while item is not None:
                if item.future.set_running_or_notify_cancel():
                    batch.append(item)
                if len(batch) >= _MAX_OPS_PER_COMMIT:
                    break
                try:
                    item = self._ops.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._run(store, batch)
            if item is None:
                return

    def _drain(self, error: MsgbusError) -> None:
        while True:
            try:
                item = self._ops.get_nowait()
            except queue.Empty:
                return
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(error)

    def _begin(self, store: _Store) -> None:
        """``BEGIN IMMEDIATE`` (take the write lock now), retrying while other processes hold it."""
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.001
        while True:
            try:
                store.conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    def _run(self, store: _Store, batch: list[_Op]) -> None:
        """Run ``batch`` in one transaction; resolve each future only after the commit."""
        results: list[tuple[_Op, Any, BaseException | None]] = []
        touched: set[int] = set()
        try:
            self._begin(store)
            now = time.time()
            for op in batch:
                try:
                    value, ids = op.fn(store, now)
                except MsgbusError as exc:  # raised before the op wrote anything: fail only this op
                    results.append((op, None, exc))
                else:
                    results.append((op, value, None))
                    touched.update(ids)
            store.conn.execute("COMMIT")
        except BaseException as exc:
            if store.conn.in_transaction:
                try:
                    store.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.debug("msgbus: sqlite rollback failed", exc_info=True)
            if len(batch) > 1 and not (isinstance(exc, sqlite3.Error) and _is_busy(exc)):
                for op in batch:  # isolate the failing operation: the others still succeed
                    self._run(store, [op])
                return
            err = _translate(exc, self._path)
            for op in batch:
                op.future.set_exception(err)
            return
        for op, value, error in results:
            if error is None:
                op.future.set_result(value)
            else:
                op.future.set_exception(error)
        if touched:
            self._on_commit(touched)


# ---------------------------------------------------------------------------------------------------------
# The asyncio side.


class SqliteMessage(NamedTuple):
    """``Delivery.raw`` of the sqlite backend: the row's position and the lease that holds it."""

    seq: int
    endpoint_id: int
    lease: int


def _new_lease() -> int:
    # os.urandom, not ``random``: processes started by fork must not share a token sequence.
    return int.from_bytes(os.urandom(8), "big") >> 1


class _SqliteDelivery(Delivery):
    __slots__ = ("_receiver", "_ref", "_settled")

    def __init__(self, receiver: _SqliteReceiver, record: Record, attempt: int, ref: SqliteMessage) -> None:
        super().__init__(record, attempt, ref)
        self._receiver = receiver
        self._ref = ref
        self._settled = False

    async def ack(self) -> None:
        if self._settled:
            return
        self._settled = True
        await self._receiver.adapter._ack([(self._ref.seq, self._ref.lease)], self._ref.endpoint_id)

    async def nack(self, delay: float | None = None) -> None:
        seq, lease, endpoint_id = self._ref.seq, self._ref.lease, self._ref.endpoint_id
        pause = max(delay or 0.0, 0.0)
        await self._receiver._settle(self, lambda s, now: (s.nack(seq, lease, now + pause), (endpoint_id,)))

    async def dead_letter(self, reason: str) -> None:
        receiver = self._receiver
        row = _encode(dead_letter_record(self.record, reason, self.attempt, receiver.endpoint))
        seq, lease, dlq_id = self._ref.seq, self._ref.lease, receiver.dlq_id
        await receiver._settle(self, lambda s, now: (s.dead_letter(seq, lease, dlq_id, row, now), (dlq_id,)))

    async def extend(self, seconds: float) -> None:
        seq, lease = self._ref.seq, self._ref.lease
        extra = max(seconds, 0.0)
        changed = await self._receiver.adapter._call(lambda s, now: (s.extend(seq, lease, now + extra), ()))
        if not changed:
            log.warning(
                "msgbus: lease on message %s was lost before extend (it may be delivered again)", self.record.id
            )


class _SqliteReceiver(Receiver):
    """Leases messages of one queue, subscription or dead-letter destination, as many as asked for (the consumer's
    inbox keeps the prefetch limit)."""

    def __init__(self, adapter: SqliteAdapter, endpoint: Endpoint, endpoint_id: int, dlq_id: int):
        self.adapter = adapter
        self.endpoint = endpoint
        self.endpoint_id = endpoint_id
        self.dlq_id = dlq_id
        self._closed = False

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` s for deliverable messages; lease and return up to ``max_messages``.

        Polls with backoff up to ``poll_interval`` (another process's sends are seen on the next poll); a
        send, nack or settle through this adapter wakes the wait at once.
        """
        if self._closed:
            raise ClosedError(f"receiver for {self.endpoint} is closed")
        adapter = self.adapter
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        pause = _FIRST_POLL
        while True:
            deliveries = await self._lease(max_messages)
            if deliveries:
                return deliveries
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closed:
                return []
            await adapter._wait(self.endpoint_id, min(pause, remaining))
            pause = min(pause * 2, adapter.poll_interval)

    async def _lease(self, limit: int) -> list[Delivery]:
        adapter = self.adapter
        endpoint_id, lease, vt = self.endpoint_id, _new_lease(), adapter.visibility_timeout
        future = adapter._submit(lambda s, now: (s.lease(endpoint_id, limit, lease, now, now + vt), ()))
        try:
            rows: list[_Row] = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda f: self._release_orphans(f, lease))
            raise
        return [_SqliteDelivery(self, _decode(row), row[1], SqliteMessage(row[0], endpoint_id, lease)) for row in rows]

    def _release_orphans(self, future: concurrent.futures.Future[list[_Row]], lease: int) -> None:
        """Return rows leased by a receive that was cancelled before it could hand them out."""
        if future.cancelled() or future.exception() is not None or not future.result():
            return
        rows = [(row[0], lease) for row in future.result()]
        endpoint_id = self.endpoint_id

        try:
            self.adapter._submit(lambda s, now: (s.release(rows, now), (endpoint_id,)))
        except ClosedError:
            pass

    async def _settle(self, delivery: _SqliteDelivery, fn: _OpFn[int]) -> None:
        if delivery._settled:
            return
        delivery._settled = True
        changed = await self.adapter._call(fn)
        if not changed:
            log.warning("msgbus: lease on message %s expired before it was settled", delivery.record.id)

    def _claim(self, deliveries: Sequence[Delivery]) -> tuple[list[tuple[int, int]], list[Delivery]]:
        """The (seq, lease) of this receiver's deliveries not settled yet, marked settled now; and the deliveries
        of other receivers, for them to settle."""
        held: list[tuple[int, int]] = []
        others: list[Delivery] = []
        for d in deliveries:
            if not isinstance(d, _SqliteDelivery) or d._receiver is not self:
                others.append(d)
            elif not d._settled:
                d._settled = True
                held.append((d._ref.seq, d._ref.lease))
        return held, others

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack all of ``deliveries`` with one statement in one transaction."""
        held, others = self._claim(deliveries)
        for d in others:
            await d.ack()
        if held:
            await self.adapter._ack(held, self.endpoint_id)

    async def release_many(self, deliveries: Sequence[Delivery]) -> None:
        """Give back deliveries no handler got in one transaction, uncounted: a stop's hand-back is no attempt."""
        held, others = self._claim(deliveries)
        if held:
            endpoint_id = self.endpoint_id
            await self.adapter._call(lambda s, now: (s.release(held, now), (endpoint_id,)))
        await super().release_many(others)

    async def close(self) -> None:
        """Stop receiving. Held deliveries stay leased (and can still be settled) until they expire."""
        self._closed = True
        self.adapter._wake({self.endpoint_id})


class SqliteAdapter(Adapter):
    """A bus in one SQLite file. Task-safe; several adapters (in any processes) may share the file."""

    # What run() needs for its workers (2 per worker), as before: run() extends each held lease with a write of
    # its own every lock_duration / 3, so a deep buffer costs writes, and 20 consumers holding 128 each with
    # visibility_timeout=1 could not keep their leases (the contract's competing-consumers check: 134 of 3000
    # delivered twice). A lease is local: a larger fetch saves no round trip worth that.
    credit = 16

    def __init__(
        self,
        url: BusURL,
        path: str,
        *,
        visibility_timeout: float,
        poll_interval: float,
        synchronous: str,
        busy_timeout: float,
        max_message_size: int,
        dedup_window: float = 0.0,
    ) -> None:
        self.url = url
        self.path = path
        self.dedup_window = dedup_window
        self.visibility_timeout = visibility_timeout
        self.poll_interval = poll_interval
        self.max_message_size = max_message_size
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self.capabilities = Capabilities(
            ordering="per_key",
            delayed_delivery=True,
            delayed_nack=True,
            native_dead_letter=True,
            max_message_size=max_message_size,
            persistence="disk",
            cross_process=True,
            lock_extension=True,
            lock_duration=visibility_timeout,
            restartable=False,
            counts_deliveries=True,  # every lease counts, expired or nacked (a stop's hand-back does not)
            dedup_window=dedup_window or None,  # msgbus_sent
        )
        self._db: _DbThread | None = None
        self._closed = False
        self._waiters: dict[int, set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        self._waiters_lock = threading.Lock()
        self._acks: _AckBatch | None = None
        self._acks_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SqliteAdapter({self.url.redacted!r})"

    async def open(self) -> None:
        """Open (creating if needed) the database file; ``ConfigError`` if its directory is missing."""
        if self._closed:
            raise ClosedError("sqlite adapter is closed")
        if self._db is not None:
            return
        db = _DbThread(self.path, self._synchronous, self._busy_timeout, self._wake)
        self._db = db
        try:
            await asyncio.wrap_future(db.ready)
        except BaseException:
            self._db = None
            raise

    async def close(self) -> None:
        """Finish submitted operations, close the connection and wake waiting receivers; idempotent."""
        self._closed = True
        db, self._db = self._db, None
        if db is not None:
            db.stop()
            await asyncio.wrap_future(db.stopped)
        with self._waiters_lock:
            everyone = set(self._waiters)
        self._wake(everyone)

    def _submit(self, fn: _OpFn[T]) -> concurrent.futures.Future[T]:
        db = self._db
        if db is None:
            raise ClosedError("sqlite adapter is closed" if self._closed else "sqlite adapter is not open")
        return db.submit(fn)

    async def _call(self, fn: _OpFn[T]) -> T:
        return await asyncio.wrap_future(self._submit(fn))

    async def _ack(self, held: list[tuple[int, int]], endpoint_id: int) -> None:
        """Delete ``held`` (seq, lease) rows, sharing one database operation with concurrent acks.

        The per-message ack path of the consume runtime: acks from many tasks that arrive while the
        database thread is busy become one DELETE and one cross-thread wake-up, not one each.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        with self._acks_lock:
            batch = self._acks
            fresh = batch is None or batch.loop is not loop
            if fresh:
                batch = self._acks = _AckBatch(loop)
            assert batch is not None
            batch.entries.append((held, endpoint_id, waiter))
        if fresh:
            try:
                future = self._submit(lambda s, now: self._flush_acks(batch, s))
            except ClosedError:
                with self._acks_lock:
                    if self._acks is batch:
                        self._acks = None
                raise
            future.add_done_callback(batch.finish)
        await waiter

    def _flush_acks(self, batch: _AckBatch, store: _Store) -> tuple[None, Iterable[int]]:
        """On the database thread: detach ``batch`` (later acks start a new one) and delete its rows."""
        with self._acks_lock:
            if self._acks is batch:
                self._acks = None
        pairs = [pair for held, _, _ in batch.entries for pair in held]
        changed = store.ack(pairs)
        if changed < len(pairs):
            log.warning("msgbus: %d message(s) were acked after their lease expired", len(pairs) - changed)
        return None, {endpoint_id for _, endpoint_id, _ in batch.entries}

    async def _wait(self, endpoint_id: int, seconds: float) -> None:
        """Sleep up to ``seconds``, or until a commit through this adapter touches ``endpoint_id``."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        entry = (loop, waiter)
        with self._waiters_lock:
            self._waiters.setdefault(endpoint_id, set()).add(entry)
        try:
            await asyncio.wait([waiter], timeout=seconds)
        finally:
            with self._waiters_lock:
                waiting = self._waiters.get(endpoint_id)
                if waiting is not None:
                    waiting.discard(entry)
                    if not waiting:
                        del self._waiters[endpoint_id]
            waiter.cancel()
        if self._closed:
            raise ClosedError("sqlite adapter is closed")

    def _wake(self, endpoint_ids: set[int]) -> None:
        """Wake receivers waiting on ``endpoint_ids`` (called from any thread)."""
        with self._waiters_lock:
            entries = [e for i in endpoint_ids for e in self._waiters.get(i, ())]
        for loop, waiter in entries:
            try:
                loop.call_soon_threadsafe(_resolve, waiter)
            except RuntimeError:  # that loop is closed; nobody is waiting any more
                pass

    async def ping(self) -> None:
        """A ``SELECT 1`` on the database thread: the file is open and the thread is not stuck."""
        await self._call(lambda s, now: (s.conn.execute("SELECT 1").fetchone(), ()))

    async def stats(self, endpoint: Endpoint) -> Mapping[str, float]:
        """Counted in the file: waiting, leased (in flight), dead letters, and the oldest message's age."""

        def count(s: _Store, now: float) -> tuple[dict[str, float], Iterable[int]]:
            live = s.endpoint_id(endpoint, create=False)
            dead = s.endpoint_id(replace(endpoint, dead_letter=True), create=False)
            total, held, oldest = s.conn.execute(
                "SELECT count(*), count(CASE WHEN lease IS NOT NULL AND visible_at > ? THEN 1 END), min(timestamp)"
                " FROM msgbus_messages WHERE endpoint = ?",
                (now, live),
            ).fetchone()
            (dead_n,) = s.conn.execute("SELECT count(*) FROM msgbus_messages WHERE endpoint = ?", (dead,)).fetchone()
            found = {"depth": total - held, "in_flight": held, "dead_letters": dead_n}
            if oldest is not None:
                found["oldest_age"] = max(0.0, now - oldest)
            return found, ()

        return await self._call(count)

    async def declare(self, endpoint: Endpoint, *, create: bool = True) -> None:
        """Create the endpoint, its topic and its dead-letter destination (idempotent, across processes)."""
        _check_endpoint(endpoint)

        def run(s: _Store, now: float) -> tuple[None, Iterable[int]]:
            s.declare(endpoint, create)
            return None, ()

        await self._call(run)

    async def delete(self, endpoint: Endpoint) -> None:
        """Delete the queue, its dead-letter destination and their messages in one commit; idempotent."""
        name = deleted_queue(endpoint)

        def run(s: _Store, now: float) -> tuple[None, Iterable[int]]:
            s.delete(name)
            return None, ()

        await self._call(run)

    async def send(self, endpoint: Endpoint, records: Sequence[Record], delay: float | None = None) -> None:
        """Store ``records``; returns after the commit. A topic send copies them to each subscription."""
        _check_endpoint(endpoint)
        for record in records:
            size = record.size()
            if size > self.max_message_size:
                raise MessageTooLarge(size, self.max_message_size)
        if not records:
            return
        rows = [_encode(r) for r in records]
        pause = max(delay or 0.0, 0.0)
        window = self.dedup_window
        keys = [dedup_key(r) for r in records] if window else []
        await self._call(
            lambda s, now: _with_ids(s.send(endpoint, rows, now + pause, (keys, now, window) if window else None))
        )

    async def receiver(self, endpoint: Endpoint, prefetch: int) -> Receiver:
        """A receiver for a queue, a subscription or a dead-letter destination (created if missing)."""
        _check_endpoint(endpoint)
        if endpoint.kind == "topic" and endpoint.subscription is None:
            raise ConfigError(f"cannot receive from {endpoint} without a subscription name")
        dlq = Endpoint(endpoint.kind, endpoint.name, endpoint.subscription, dead_letter=True)
        ids = await self._call(
            lambda s, now: ((s.endpoint_id(endpoint, create=True), s.endpoint_id(dlq, create=True)), ())
        )
        return _SqliteReceiver(self, endpoint, ids[0], ids[1])


class _AckBatch:
    """Acks gathered while a flush is queued; resolved together on their event loop."""

    __slots__ = ("entries", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.entries: list[tuple[list[tuple[int, int]], int, asyncio.Future[None]]] = []

    def finish(self, future: concurrent.futures.Future[None]) -> None:
        """Done-callback of the flush (on the database thread): settle every waiter on its loop."""
        try:
            self.loop.call_soon_threadsafe(self._resolve, future)
        except RuntimeError:  # the loop is closed; nobody awaits these acks any more
            pass

    def _resolve(self, future: concurrent.futures.Future[None]) -> None:
        error = future.exception()
        for _, _, waiter in self.entries:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


def _with_ids(targets: list[int]) -> tuple[None, Iterable[int]]:
    return None, targets


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _check_endpoint(endpoint: Endpoint) -> None:
    if endpoint.kind not in ("queue", "topic"):
        raise ConfigError(f"unknown endpoint kind {endpoint.kind!r}")
    if not endpoint.name:
        raise ConfigError("queue and topic names must not be empty")
    if endpoint.subscription == "":
        raise ConfigError("subscription names must not be empty")
    if endpoint.kind == "queue" and endpoint.subscription is not None:
        raise ConfigError(f"queue {endpoint.name!r} cannot have a subscription")
    if endpoint.kind == "topic" and endpoint.dead_letter and endpoint.subscription is None:
        raise ConfigError(f"dead letters belong to a subscription of topic {endpoint.name!r}, name one")


def database_path(url: BusURL) -> str:
    """The absolute file path a ``sqlite://`` URL names (relative paths resolve against the cwd now)."""
    if url.host or url.port or url.username or url.password:
        raise ConfigError("sqlite URLs take no host: use sqlite:///relative.db or sqlite:////absolute/path.db")
    path = url.path[1:] if url.path.startswith("/") else url.path
    if not path or path.endswith("/"):
        raise ConfigError("sqlite URL needs a database file, e.g. sqlite:///./msgbus.db")
    if path == ":memory:":
        raise ConfigError("sqlite://:memory: is not supported; use memory:// for a bus without a file")
    if "\x00" in path:
        raise ConfigError("sqlite database path must not contain a NUL character")
    try:
        path.encode()  # sqlite3 takes the path as UTF-8
    except UnicodeError:
        raise ConfigError("sqlite database path is not valid UTF-8 text") from None
    return os.path.abspath(path)


def create(url: BusURL, options: OptionReader) -> Adapter:
    """The ``sqlite`` adapter factory (entry point ``msgbus.adapters``). Reads options; touches no files."""
    path = database_path(url)
    return SqliteAdapter(
        url,
        path,
        visibility_timeout=options.float("visibility_timeout", 30.0, min=0.001),
        poll_interval=options.float("poll_interval", 0.05, min=0.001),
        synchronous=options.choice("synchronous", "normal", ("normal", "full")),
        busy_timeout=options.float("busy_timeout", 10.0, min=0.0),
        max_message_size=options.int("max_message_size", 1_048_576, min=1),
        dedup_window=options.float("dedup_window", 0.0, min=0.0),
    )
