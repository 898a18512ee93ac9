"""Receiving from one queue, subscription or dead-letter destination: leases, waits, settlements.

A receive leases as many as it is asked for (the core keeps the prefetch limit) with one ``FOR UPDATE SKIP
LOCKED`` statement. When nothing is
deliverable it waits for a NOTIFY on the endpoint (a send, a nack, an ack that frees a key), for the next row
to become visible (a delay or a lease running out: the table says when), or ``poll_interval`` at most, in
case a notification was lost with a connection.

Read-ahead: a receive that returns a full batch of at least ``READ_AHEAD_MIN`` first deliveries starts leasing the
next one, so that lease's round trip overlaps the handlers. The next receive hands those rows out first. A batch
with a redelivery reads nothing ahead: a consumer working through what a dead one held (``run()`` runs those one at
a time, in case one of them killed it) holds nothing more, so a second death counts no more than its buffer.
Read-ahead rows are leased, unknown to the runtime and never extended: they are given back uncounted
(``attempts - 1``) once ``visibility_timeout * READ_AHEAD_AGE`` old, by ``release()`` and by ``close()``; only a
dying process leaves them to come back, counted, when the lease runs out.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import replace
from typing import Any, NamedTuple, Protocol, TypeVar

from msgbus.adapter import Delivery, Endpoint, Receiver, Record, dead_letter_record, wait_set
from msgbus.errors import ClosedError, DecodeError, MsgbusError

from ._codec import decode, encode
from ._config import PostgresOptions
from ._schema import Statements

log = logging.getLogger("msgbus.postgresql")

T = TypeVar("T")

#: Read ahead only after a full batch at least this large: a consumer working through a backlog (``run()`` asks for
#: its prefetch, 128 at the default), not a caller of ``receive(1)`` whose next rows other consumers should get.
READ_AHEAD_MIN = 32
#: Read-ahead rows this share of ``visibility_timeout`` old (from when their lease was sent) are given back, not
#: handed out: ``run()`` extends a held message's lease within a third of it, so a lease handed out younger than a
#: quarter still has more than a third left by then.
READ_AHEAD_AGE = 0.25


class Link(Protocol):
    """What a receiver needs from its adapter: its statements, a retrying connection, and wake-ups."""

    @property
    def sql(self) -> Statements: ...

    @property
    def options(self) -> PostgresOptions: ...

    async def run(self, doing: str, fn: Callable[[Any], Awaitable[T]]) -> T: ...

    def listen(self, endpoint_id: int, wake: asyncio.Event) -> None: ...

    def unlisten(self, endpoint_id: int, wake: asyncio.Event) -> None: ...


class PostgresMessage(NamedTuple):
    """``Delivery.raw`` of the PostgreSQL backend: the row and the lease that holds it."""

    seq: int
    endpoint_id: int
    lease: int


class _Ahead(NamedTuple):
    """A lease sent for the next receive: its rows, the token that holds them, when it was sent (loop clock)."""

    task: asyncio.Future[list[Any]]
    token: int
    started: float


def new_lease() -> int:
    # os.urandom, not ``random``: processes started by fork must not share a token sequence.
    return int.from_bytes(os.urandom(8), "big") >> 1


class PostgresReceiver(Receiver):
    """Leases messages of one endpoint, as many as asked for. For one task at a time."""

    def __init__(self, adapter: Link, endpoint: Endpoint, endpoint_id: int, dlq_id: int) -> None:
        self._adapter = adapter
        self.endpoint = endpoint
        self.endpoint_id = endpoint_id
        self.dlq_id = dlq_id
        self._source = replace(endpoint, dead_letter=False)
        self._wake = asyncio.Event()
        self._closed = False
        self._ahead: _Ahead | None = None  # the read-ahead lease in flight, or done and not collected yet
        self._kept: list[PostgresDelivery] = []  # read-ahead rows collected, not handed out yet
        self._kept_since = 0.0  # when the oldest lease of ``_kept`` was sent (the loop's clock)
        self._expiry: asyncio.TimerHandle | None = None  # gives the read-ahead back when its oldest lease is too old
        adapter.listen(endpoint_id, self._wake)

    def __repr__(self) -> str:
        return f"PostgresReceiver({self.endpoint})"

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` seconds for deliverable messages; lease and return up to ``max_messages``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        options = self._adapter.options
        got = [] if self._closed else await self._from_read_ahead(max_messages)
        while not got:
            if self._closed:
                raise ClosedError(f"{self!r} is closed")
            pause = options.poll_interval
            self._wake.clear()  # before looking: a notification that arrives meanwhile is not lost
            got = await self._lease(max_messages)
            if got:
                break
            soonest = await self._adapter.run(
                f"look at {self.endpoint}", lambda c: c.fetchval(self._adapter.sql.next_visible, self.endpoint_id)
            )
            if soonest is not None:
                pause = min(pause, max(float(soonest), 0.001))
            left = deadline - loop.time()
            if left <= 0:
                return []
            # Waited out the caller's timeout: what comes now is for the next call.
            if not await wait_set(self._wake, min(left, pause)) and pause >= left:
                return []
        if (
            max_messages >= READ_AHEAD_MIN
            and len(got) == max_messages
            and all(d.attempt == 1 for d in got)
            and self._read_ahead(max_messages - len(self._kept))
        ):
            try:
                await asyncio.sleep(0)  # the lease goes out now, not when a handler first awaits
            except asyncio.CancelledError:
                self._release_soon(got)
                raise
        return got

    def _leasing(self, limit: int, token: int, doing: str) -> asyncio.Future[list[Any]]:
        """The lease statement for up to ``limit`` rows under ``token``, running as a task: its raw rows."""
        sql, endpoint_id = self._adapter.sql, self.endpoint_id
        vt = self._adapter.options.visibility_timeout
        return asyncio.ensure_future(
            self._adapter.run(f"{doing} {self.endpoint}", lambda c: c.fetch(sql.lease, endpoint_id, limit, token, vt))
        )

    async def _lease(self, limit: int) -> list[Delivery]:
        token = new_lease()
        leasing = self._leasing(limit, token, "receive from")
        try:
            rows = await asyncio.shield(leasing)
        except asyncio.CancelledError:
            leasing.add_done_callback(lambda done: self._release_orphans(done, token))
            raise
        good, bad = self._decode(rows, token)
        try:
            await self._dead_letter_malformed(bad)
        except asyncio.CancelledError:
            self._release_soon(good)
            raise
        return list(good)

    def _decode(self, rows: list[Any], token: int) -> tuple[list[PostgresDelivery], list[tuple[PostgresDelivery, str]]]:
        """Deliveries of leased rows in ``seq`` order, and the rows msgbus did not write (their meta fails), each
        with the reason."""
        rows.sort(key=lambda r: r[0])
        good: list[PostgresDelivery] = []
        bad: list[tuple[PostgresDelivery, str]] = []
        for seq, attempts, key, body, meta in rows:
            ref = PostgresMessage(seq, self.endpoint_id, token)
            try:
                good.append(PostgresDelivery(self, decode(key, body, meta, seq), attempts, ref))
            except DecodeError as exc:
                bad.append((PostgresDelivery(self, Record(body=body, id=f"postgresql-{seq}"), attempts, ref), str(exc)))
        return good, bad

    async def _dead_letter_malformed(self, bad: list[tuple[PostgresDelivery, str]]) -> None:
        """Dead-letter rows msgbus did not write, rather than loop on them."""
        for d, reason in bad:
            try:
                await d.dead_letter(f"DecodeError: {reason}")
            except MsgbusError as err:
                log.warning("postgresql: could not dead-letter malformed row %d: %s", d.raw.seq, err)

    # -- read-ahead ---------------------------------------------------------------------------------

    def _read_ahead(self, limit: int) -> bool:
        """Start leasing up to ``limit`` rows for the next receive, unless a read-ahead lease is in flight."""
        if limit <= 0 or self._ahead is not None or self._closed:
            return False
        loop = asyncio.get_running_loop()
        token, started = new_lease(), loop.time()
        task = self._leasing(limit, token, "read ahead from")
        task.add_done_callback(_retrieve)  # a failure is raised by the next receive, or only logged
        self._ahead = _Ahead(task, token, started)
        self._rearm()
        return True

    async def _from_read_ahead(self, limit: int) -> list[Delivery]:
        """Up to ``limit`` read-ahead rows, waiting for the read-ahead lease if one is in flight; none when there is
        no read-ahead, or when it is too old to hand out (it is given back, uncounted)."""
        ahead = self._ahead
        if ahead is not None:
            try:
                rows = await asyncio.shield(ahead.task)  # cancelled: the lease stays read ahead, nothing lost
            except asyncio.CancelledError:
                raise
            except BaseException:
                if self._ahead is ahead:
                    self._ahead = None
                    self._rearm()
                raise
            if self._ahead is ahead:  # else release(), close() or the expiry took it meanwhile
                self._ahead = None
                if not self._kept:
                    self._kept_since = ahead.started
                # A full batch of first deliveries goes out: the next lease goes out first, and runs while this one
                # is decoded.
                full = len(self._kept) + len(rows)
                now = (
                    limit >= READ_AHEAD_MIN
                    and full >= limit
                    and not self._too_old(self._kept_since)
                    and all(row[1] == 1 for row in rows)
                    and all(d.attempt == 1 for d in self._kept)
                )
                try:
                    if now and self._read_ahead(2 * limit - full):
                        await asyncio.sleep(0)
                finally:  # cancelled: the rows stay read ahead
                    good, bad = self._decode(rows, ahead.token)
                    self._kept += good
                    self._rearm()
                await self._dead_letter_malformed(bad)
        if not self._kept:
            return []
        if self._too_old(self._kept_since):
            await self._give_back()  # a fresh lease follows: these were leased too long ago to hand out
            return []
        out: list[Delivery] = list(self._kept[:limit])
        del self._kept[:limit]
        self._rearm()
        return out

    def _too_old(self, sent: float) -> bool:
        """Whether rows of a lease sent at ``sent`` are too old to hand out (``READ_AHEAD_AGE`` of the lease)."""
        age = self._adapter.options.visibility_timeout * READ_AHEAD_AGE
        return asyncio.get_running_loop().time() - sent >= age

    def _rearm(self) -> None:
        """Set the timer that gives the read-ahead back when its oldest lease reaches the age limit (none if empty)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        sent = [self._kept_since] if self._kept else []
        if self._ahead is not None:
            sent.append(self._ahead.started)
        if sent:
            age = self._adapter.options.visibility_timeout * READ_AHEAD_AGE
            self._expiry = asyncio.get_running_loop().call_at(min(sent) + age, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        _spawn(self._give_back())

    async def _give_back(self) -> None:
        """Give the read-ahead back uncounted (``attempts - 1``): what is collected, and the rows of the lease in
        flight once it returns. Runs to the end even if the caller is cancelled; failures are logged (the rows
        then come back, counted, when their lease runs out)."""
        ahead, self._ahead = self._ahead, None
        kept, self._kept = self._kept, []
        self._rearm()
        if ahead is not None or kept:
            await asyncio.shield(_spawn(self._release_ahead(ahead, kept)))

    async def _release_ahead(self, ahead: _Ahead | None, kept: list[PostgresDelivery]) -> None:
        by_lease = _by_lease(kept)
        if ahead is not None:
            try:
                rows = await ahead.task
            except MsgbusError as err:
                log.debug("postgresql: the read-ahead lease on %s failed: %s", self.endpoint, err)
            else:
                if rows:
                    by_lease.setdefault(ahead.token, []).extend(row[0] for row in rows)
        await self._release_quietly(by_lease)

    def _release_orphans(self, leasing: asyncio.Future[list[Any]], token: int) -> None:
        """Give back rows leased by a receive that was cancelled before it could hand them out."""
        if leasing.cancelled() or leasing.exception() is not None or not leasing.result():
            return
        _spawn(self._release_quietly({token: [row[0] for row in leasing.result()]}))

    def _release_soon(self, deliveries: Sequence[Delivery]) -> None:
        """Give back, in the background, deliveries a cancelled receive could not return."""
        _spawn(self._release_quietly(_by_lease(d for d in deliveries if isinstance(d, PostgresDelivery))))

    async def _release_quietly(self, by_lease: dict[int, list[int]]) -> None:
        try:
            await self._release_rows(by_lease)
        except MsgbusError as err:  # they come back, counted, when the lease runs out
            log.debug("postgresql: giving back %d unclaimed lease(s) on %s failed: %s", len(by_lease), self, err)

    async def _release_rows(self, by_lease: dict[int, list[int]]) -> None:
        """Give rows back uncounted, one statement per lease they came in (usually one)."""
        if not by_lease:
            return
        sql = self._adapter.sql

        async def release(conn: Any) -> None:
            for token, seqs in by_lease.items():
                await conn.execute(sql.release, seqs, token)

        await self._adapter.run(f"release on {self.endpoint}", release)

    async def _settle(self, delivery: PostgresDelivery, doing: str, statement: str, *args: Any) -> None:
        if delivery._settled:
            return
        delivery._settled = True
        row = await self._adapter.run(doing, lambda c: c.fetchrow(statement, *args))
        if row is None or not row[0]:
            log.warning("postgresql: the lease on message %s expired before it was settled", delivery.record.id)

    def _claim(self, deliveries: Sequence[Delivery]) -> tuple[list[PostgresMessage], list[Delivery]]:
        """The rows of this receiver's deliveries not settled yet, marked settled now; and the deliveries of other
        receivers, for them to settle."""
        held: list[PostgresMessage] = []
        others: list[Delivery] = []
        for d in deliveries:
            if not isinstance(d, PostgresDelivery) or d._receiver is not self:
                others.append(d)
            elif not d._settled:
                d._settled = True
                held.append(d.raw)
        return held, others

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack all of ``deliveries`` with one statement."""
        held, others = self._claim(deliveries)
        for d in others:
            await d.ack()
        if not held:
            return
        seqs, leases = [m.seq for m in held], [m.lease for m in held]
        sql = self._adapter.sql
        row = await self._adapter.run(f"ack on {self.endpoint}", lambda c: c.fetchrow(sql.ack, seqs, leases))
        gone = 0 if row is None else int(row[0])
        if gone < len(seqs):
            log.warning("postgresql: %d message(s) were acked after their lease expired", len(seqs) - gone)

    async def release_many(self, deliveries: Sequence[Delivery]) -> None:
        """Give back deliveries no handler got, uncounted (``attempts - 1``: a stop's hand-back is no attempt), with
        one statement per lease they came in (usually one)."""
        held, others = self._claim(deliveries)
        by_lease: dict[int, list[int]] = {}
        for m in held:
            by_lease.setdefault(m.lease, []).append(m.seq)
        await self._release_rows(by_lease)
        await super().release_many(others)

    async def release(self) -> None:
        """Give the read-ahead back uncounted, so other consumers get it now; receiving again reads ahead again."""
        await self._give_back()

    async def close(self) -> None:
        """Stop receiving and give the read-ahead back. Held deliveries stay leased (and can still be settled)
        until the lease runs out."""
        if not self._closed:
            self._closed = True
            self._adapter.unlisten(self.endpoint_id, self._wake)
            self._wake.set()
            await self._give_back()


# Tasks that give leases back: referenced until done (the event loop keeps only weak references).
_background: set[asyncio.Task[None]] = set()


def _spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


def _by_lease(deliveries: Iterable[PostgresDelivery]) -> dict[int, list[int]]:
    """The rows of deliveries no handler got, by lease token, marked settled (a stale handle settles nothing)."""
    by_lease: dict[int, list[int]] = {}
    for d in deliveries:
        d._settled = True
        by_lease.setdefault(d.raw.lease, []).append(d.raw.seq)
    return by_lease


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a task's failure as seen (it is raised or logged where the task is awaited)."""
    if not task.cancelled():
        task.exception()


class PostgresDelivery(Delivery):
    """A leased row; settled by statements guarded by the lease token."""

    __slots__ = ("_receiver", "_settled")

    raw: PostgresMessage

    def __init__(self, receiver: PostgresReceiver, record: Record, attempt: int, ref: PostgresMessage) -> None:
        super().__init__(record, attempt, ref)
        self._receiver = receiver
        self._settled = False

    async def ack(self) -> None:
        """Delete the row (if the lease still holds it)."""
        r = self._receiver
        sql = r._adapter.sql
        await r._settle(self, f"ack on {r.endpoint}", sql.ack, [self.raw.seq], [self.raw.lease])

    async def nack(self, delay: float | None = None) -> None:
        """Give the row back, visible again after ``delay`` seconds (at once: its consumers are woken)."""
        r = self._receiver
        pause = max(delay or 0.0, 0.0)
        await r._settle(self, f"nack on {r.endpoint}", r._adapter.sql.nack, self.raw.seq, self.raw.lease, pause)

    async def dead_letter(self, reason: str) -> None:
        """Move the row to the dead-letter destination in one statement, with the reason in its headers."""
        r = self._receiver
        dead = dead_letter_record(self.record, reason, self.attempt, r._source)
        _, _, meta = encode(dead)
        sql = r._adapter.sql
        await r._settle(
            self, f"dead-letter on {r.endpoint}", sql.dead_letter, self.raw.seq, self.raw.lease, r.dlq_id, meta
        )

    async def extend(self, seconds: float) -> None:
        """Push the lease's expiry to ``seconds`` from now (the server's clock)."""
        r = self._receiver
        sql, seq, lease, extra = r._adapter.sql, self.raw.seq, self.raw.lease, max(seconds, 0.0)
        status = await r._adapter.run(
            f"extend a lease on {r.endpoint}", lambda c: c.execute(sql.extend, seq, lease, extra)
        )
        if status.endswith(" 0"):
            log.warning(
                "postgresql: the lease on message %s was lost before extend (it may come again)", self.record.id
            )
