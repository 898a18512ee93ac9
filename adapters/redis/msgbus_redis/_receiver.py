"""Receiving from one queue, subscription or dead-letter stream: XREADGROUP as one named consumer, housekeeping,
and settling through Lua scripts. The receiver holds a ``Link`` to its adapter, not the adapter itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from redis import exceptions as rx
from redis.asyncio import Redis

from msgbus.adapter import (
    Delivery,
    Receiver,
    Record,
    dead_letter_record,
)
from msgbus.errors import ClosedError

from ._codec import decode, encode, flatten, pairs
from ._config import RedisOptions
from ._errors import is_nogroup, translated
from ._names import GroupSpec, Route
from ._scripts import Scripts

log = logging.getLogger("msgbus.redis")

_MOVE_BATCH = 500  # most delayed entries one housekeeping round moves per sorted set


@dataclass(slots=True)
class StreamEntry:
    """``Delivery.raw`` on this backend: where the entry lives and its fields by name (a name Redis returned twice:
    the last value).

    Treat it as immutable; it is not frozen because one is made per message, and a frozen one costs three times as
    much to make (like ``Record``).
    """

    stream: str
    entry_id: str
    fields: Mapping[bytes, bytes]


class Link(Protocol):
    """What a receiver needs from its adapter: the settings, the connection and its scripts, and the groups."""

    options: RedisOptions
    secrets: tuple[str | None, ...]

    def connected(self) -> tuple[Redis, Scripts]: ...

    async def create_groups(self, groups: Sequence[GroupSpec], *, recover: bool = False) -> None: ...

    def forget(self, receiver: RedisReceiver) -> None: ...


class RedisReceiver(Receiver):
    """Reads one queue, subscription or dead-letter stream with XREADGROUP as one named consumer.

    Every ``poll_interval`` a receive also does housekeeping in one Lua call: moves due delayed
    entries into their streams, reclaims entries idle longer than ``visibility_timeout`` (their
    consumer died), and trims the topic stream below what its slowest group still needs.
    """

    def __init__(self, adapter: Link, r: Route) -> None:
        self._adapter = adapter
        self._options = adapter.options
        self._route = r
        self._source = replace(r.endpoint, dead_letter=False)
        self._consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._next_housekeeping = 0.0
        self._next_trim = 0.0
        self._turn = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisReceiver({self._route.endpoint}, consumer={self._consumer!r})"

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` seconds for deliveries; up to ``max_messages`` (the core keeps the prefetch limit)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            if self._closed:
                raise ClosedError(f"{self!r} is closed")
            now = loop.time()
            if now >= self._next_housekeeping:
                claimed = await self._housekeeping(max_messages)
                if claimed:
                    return list(claimed)
                now = loop.time()
            block_ms = int((min(deadline, self._next_housekeeping) - now) * 1000)
            got = await self._read(max_messages, block_ms if block_ms >= 1 else None)
            if got or loop.time() >= deadline:
                return list(got)

    def _reading(self, room: int) -> tuple[str, ...]:
        """The streams ``receive`` reads new entries from, ``room`` entries in all."""
        streams = self._route.streams
        if room < len(streams):  # XREADGROUP's COUNT is per stream: read one stream in turn
            streams = (streams[self._turn % len(streams)],)
            self._turn += 1
        return streams

    async def _read(self, room: int, block_ms: int | None) -> list[RedisDelivery]:
        r = self._route
        streams = self._reading(room)
        client, _ = self._adapter.connected()
        with translated(f"receive from {r.endpoint}", secrets=self._adapter.secrets):
            try:
                reply: Any = await client.xreadgroup(
                    r.group,
                    self._consumer,
                    dict.fromkeys(streams, ">"),
                    count=max(1, room // len(streams)),
                    block=block_ms,
                )
            except rx.ResponseError as exc:
                if not is_nogroup(exc):
                    raise
                await self._adapter.create_groups(r.groups, recover=True)
                return []
        out: list[RedisDelivery] = []
        for stream, items in reply or ():
            out += self._deliveries(stream.decode(), ((eid, flat, 1) for eid, flat in items))
        return out

    async def _housekeeping(self, room: int) -> list[RedisDelivery]:
        r = self._route
        _, scripts = self._adapter.connected()
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._next_housekeeping = now + self._options.poll_interval
        periodic = now >= self._next_trim  # trimming and pruning, every trim_interval
        if periodic:
            self._next_trim = now + self._options.trim_interval
        trim = periodic and r.shared is not None and r.shared in r.streams
        reclaim_from = r.streams[self._turn % len(r.streams)]
        self._turn += 1
        keys = [key for pair in r.movers for key in pair] + [reclaim_from, r.shared or reclaim_from]
        args: list[str | int] = [
            len(r.movers),
            _MOVE_BATCH,
            r.group,
            self._consumer,
            max(1, round(self._options.visibility_timeout * 1000)),
            room,
            "1" if trim else "0",
            max(1, round(self._options.idle_consumer_timeout * 1000)) if periodic else 0,
        ]
        with translated(f"receive from {r.endpoint}", secrets=self._adapter.secrets):
            try:
                result: Any = await scripts.maintain(keys=keys, args=args)
                moved, claimed, _ = result
            except rx.ResponseError as exc:
                if not is_nogroup(exc):
                    raise
                await self._adapter.create_groups(r.groups, recover=True)
                return []
        if moved >= _MOVE_BATCH:
            self._next_housekeeping = now  # more are due: move them on the next call
        return self._deliveries(reclaim_from, [(eid, flat, int(count)) for eid, count, flat in claimed])

    def _deliveries(self, stream: str, entries: Iterable[tuple[bytes, Sequence[bytes], int]]) -> list[RedisDelivery]:
        """``(entry id, fields as Redis sends them, deliveries)`` of ``stream`` as deliveries. Entry ids stay bytes for
        the acks (redis-py then sends them as they are) and are ``str`` in ``raw``."""
        body_fields = self._options.body_fields
        out: list[RedisDelivery] = []
        append = out.append
        for rid, flat, deliveries in entries:
            # Any entry is deliverable (``_codec``): one written by other code gets the field convention.
            record, before = decode(flat, rid, body_fields)
            append(RedisDelivery(self, record, before + deliveries, stream, rid, flat))
        return out

    # -- settling (called by RedisDelivery) ---------------------------------------------------------

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """XACK (and XDEL from single-group streams) every delivery in one MULTI/EXEC round trip."""
        mine = [d for d in deliveries if isinstance(d, RedisDelivery)]
        by_stream: dict[str, list[bytes]] = {}
        for d in mine:
            by_stream.setdefault(d.stream, []).append(d.rid)
        if not by_stream:
            return
        client, _ = self._adapter.connected()
        pipe = client.pipeline(transaction=True)
        for stream, ids in by_stream.items():
            pipe.xack(stream, self._route.group, *ids)
            if stream in self._route.deletable:
                pipe.xdel(stream, *ids)
        with translated(f"ack on {self._route.endpoint}", secrets=self._adapter.secrets):
            try:
                await pipe.execute()
            except rx.ResponseError as exc:
                if not is_nogroup(exc):  # the group is gone, and with it anything to ack
                    raise

    async def _settle(
        self, d: RedisDelivery, target: str, delayed: str, delay: float | None, fields: dict[bytes, bytes]
    ) -> None:
        _, scripts = self._adapter.connected()
        delay_ms = 0 if delay is None or delay <= 0 else math.ceil(delay * 1000)
        deletable = "1" if d.stream in self._route.deletable else "0"
        args: list[bytes | str | int] = [self._route.group, d.rid, deletable, delay_ms, self._consumer]
        args += flatten(fields)
        with translated(f"settle on {self._route.endpoint}", secrets=self._adapter.secrets):
            try:
                await scripts.settle(keys=[d.stream, target, delayed], args=args)
            except rx.ResponseError as exc:
                if not is_nogroup(exc):
                    raise

    async def _nack(self, d: RedisDelivery, delay: float | None) -> None:
        r = self._route
        await self._settle(
            d, r.retry_stream, r.retry_delayed, delay, encode(d.record, d.attempt, self._options.body_fields)
        )
        if delay is not None and delay > 0:
            # Wake up in time to move it back even if nothing else is going on.
            loop = asyncio.get_running_loop()
            self._next_housekeeping = min(self._next_housekeeping, loop.time() + delay)

    async def _dead_letter(self, d: RedisDelivery, reason: str) -> None:
        r = self._route
        record = dead_letter_record(d.record, reason, d.attempt, self._source)
        await self._settle(d, r.dead_letter_stream, r.retry_delayed, None, encode(record, 0, self._options.body_fields))

    async def _extend(self, d: RedisDelivery) -> None:
        _, scripts = self._adapter.connected()
        with translated(f"extend lock on {self._route.endpoint}", secrets=self._adapter.secrets):
            extended = await scripts.extend(keys=[d.stream], args=[self._route.group, d.rid, self._consumer])
        if not extended:
            log.debug("msgbus: %s on %s is no longer ours; not extended", d.rid.decode(), self._route.endpoint)

    async def close(self) -> None:
        """Stop receiving; unsettled entries return to others after ``visibility_timeout``. Idempotent.

        The consumer name is removed from its group only when it holds no pending entry (removing
        it would drop those entries from the group's pending list, losing them).
        """
        if self._closed:
            return
        self._closed = True
        self._adapter.forget(self)
        try:
            _, scripts = self._adapter.connected()
        except ClosedError:
            return
        try:
            await self._leave(scripts)
            streams = [*self._route.streams, *self._route.partitions]
            await scripts.forget_consumer(keys=streams, args=[self._route.group, self._consumer])
        except (rx.RedisError, OSError) as exc:  # best effort: a leftover idle consumer name is harmless
            log.debug("could not remove consumer %s: %s", self._consumer, type(exc).__name__)

    async def _leave(self, scripts: Scripts) -> None:
        """Before the consumer name goes: give up what it holds besides pending entries (partition leases)."""


class RedisDelivery(Delivery):
    """A stream entry pending in the group under this receiver's consumer name."""

    __slots__ = ("_flat", "_receiver", "rid", "stream")

    def __init__(
        self,
        receiver: RedisReceiver,
        record: Record,
        attempt: int,
        stream: str,
        rid: bytes,
        flat: Sequence[bytes],
        problem: str | None = None,
    ) -> None:
        # Delivery.__init__'s assignments, without the call: one of these is made per message, and it holds
        # what ``entry`` is made of rather than an entry (one object less per message for the GC to track).
        self.record = record
        self.attempt = attempt
        self.problem = problem
        self._receiver = receiver
        self.stream = stream
        self.rid = rid  # the entry id as Redis sent it
        self._flat = flat  # the fields as Redis sent them: ``[name, value, ...]``

    @property
    def entry(self) -> StreamEntry:
        """Where the entry lives and its fields (made on demand)."""
        return StreamEntry(self.stream, self.rid.decode(), pairs(self._flat))

    @property
    def raw(self) -> StreamEntry:  # type: ignore[override]  # read-only here: made on demand
        """``Delivery.raw``: the ``StreamEntry``."""
        return self.entry

    async def ack(self) -> None:
        """XACK (+ XDEL on single-group streams) in one transaction."""
        await self._receiver.ack_many([self])

    async def nack(self, delay: float | None = None) -> None:
        """Atomically re-add a copy (attempt count carried) now or via the delayed set, then XACK this one."""
        await self._receiver._nack(self, delay)

    async def dead_letter(self, reason: str) -> None:
        """Atomically add it to the dead-letter stream with the reason headers, then XACK it here."""
        await self._receiver._dead_letter(self, reason)

    async def extend(self, seconds: float) -> None:
        """XCLAIM to self, only while it is still ours: it stays ours for another ``visibility_timeout``.

        Redis cannot set an idle time in the future, so ``seconds`` beyond the visibility timeout is
        not honoured; the runtime extends again before ``lock_duration`` runs out.
        """
        await self._receiver._extend(self)
