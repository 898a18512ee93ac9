"""Receiving from one queue, subscription or dead-letter destination: leases, waits, settlements.

A receive leases as many as it is asked for (the core keeps the prefetch limit) with one ``FOR UPDATE SKIP
LOCKED`` statement. When nothing is
deliverable it waits for a NOTIFY on the endpoint (a send, a nack, an ack that frees a key), for the next row
to become visible (a delay or a lease running out: the table says when), or ``poll_interval`` at most, in
case a notification was lost with a connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, NamedTuple, Protocol, TypeVar

from msgbus.adapter import Delivery, Endpoint, Receiver, Record, dead_letter_record, wait_set
from msgbus.errors import ClosedError, DecodeError, MsgbusError

from ._codec import decode, encode
from ._config import PostgresOptions
from ._schema import Statements

log = logging.getLogger("msgbus.postgresql")

T = TypeVar("T")


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
        adapter.listen(endpoint_id, self._wake)

    def __repr__(self) -> str:
        return f"PostgresReceiver({self.endpoint})"

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` seconds for deliverable messages; lease and return up to ``max_messages``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        options = self._adapter.options
        while True:
            if self._closed:
                raise ClosedError(f"{self!r} is closed")
            pause = options.poll_interval
            self._wake.clear()  # before looking: a notification that arrives meanwhile is not lost
            got = await self._lease(max_messages)
            if got:
                return got
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

    async def _lease(self, limit: int) -> list[Delivery]:
        sql, endpoint_id, token = self._adapter.sql, self.endpoint_id, new_lease()
        vt = self._adapter.options.visibility_timeout
        leasing = asyncio.ensure_future(
            self._adapter.run(
                f"receive from {self.endpoint}", lambda c: c.fetch(sql.lease, endpoint_id, limit, token, vt)
            )
        )
        try:
            rows = await asyncio.shield(leasing)
        except asyncio.CancelledError:
            leasing.add_done_callback(lambda done: self._release_orphans(done, token))
            raise
        rows.sort(key=lambda r: r[0])
        out: list[Delivery] = []
        for seq, attempts, key, body, meta in rows:
            ref = PostgresMessage(seq, endpoint_id, token)
            try:
                record = decode(key, body, meta, seq)
            except DecodeError as exc:  # a row msgbus did not write: dead-letter it rather than loop on it
                bad = PostgresDelivery(self, Record(body=body, id=f"postgresql-{seq}"), attempts, ref)
                try:
                    await bad.dead_letter(f"DecodeError: {exc}")
                except MsgbusError as err:
                    log.warning("postgresql: could not dead-letter malformed row %d: %s", seq, err)
                continue
            out.append(PostgresDelivery(self, record, attempts, ref))
        return out

    def _release_orphans(self, leasing: asyncio.Future[list[Any]], token: int) -> None:
        """Give back rows leased by a receive that was cancelled before it could hand them out."""
        if leasing.cancelled() or leasing.exception() is not None or not leasing.result():
            return
        seqs = [row[0] for row in leasing.result()]
        sql = self._adapter.sql

        async def release() -> None:
            try:
                await self._adapter.run("release unclaimed leases", lambda c: c.execute(sql.release, seqs, token))
            except MsgbusError as err:  # they come back when the lease runs out anyway
                log.debug("postgresql: releasing %d orphaned lease(s) failed: %s", len(seqs), err)

        task = asyncio.get_running_loop().create_task(release())
        _background.add(task)
        task.add_done_callback(_background.discard)

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
        sql = self._adapter.sql

        async def release(conn: Any) -> None:
            for token, seqs in by_lease.items():
                await conn.execute(sql.release, seqs, token)

        if by_lease:
            await self._adapter.run(f"release on {self.endpoint}", release)
        await super().release_many(others)

    async def close(self) -> None:
        """Stop receiving. Held deliveries stay leased (and can still be settled) until the lease runs out."""
        if not self._closed:
            self._closed = True
            self._adapter.unlisten(self.endpoint_id, self._wake)
            self._wake.set()


# Tasks that release orphaned leases: referenced until done (the event loop keeps only weak references).
_background: set[asyncio.Task[None]] = set()


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
