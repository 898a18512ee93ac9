"""``ordering=per_key``: a receiver that reads keyed messages from leased partition streams, one key at a time.

A keyed message is in partition stream ``crc32(key) % partitions``; unkeyed ones stay in the endpoint's stream and
are read and reclaimed as without the option (competing consumers). Each partition is read by one receiver of the
group at a time: the holder of its lease (a string key, ``SET NX PX visibility_timeout``, renewed by every
housekeeping round and by every lock extension of one of its messages). The receivers share the partitions: each
takes free ones up to ``ceil(partitions / live receivers)`` and hands over what is beyond that once nothing of it is
pending here. A new leaseholder first takes over the partition's pending entries (oldest first, before anything
unread), so a message its predecessor did not settle still comes before the key's later ones. Inside the receiver
the kit's ``KeyHold`` hands a key's next message out only once the one before is settled; a nacked message stays
pending and is delivered again in place (``XCLAIM``, counted), its key *parked* until then.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as rx

from msgbus.adapter import Delivery, KeyHold
from msgbus.errors import ClosedError

from ._errors import is_nogroup, translated
from ._names import Route, lease_key
from ._receiver import Link, RedisDelivery, RedisReceiver
from ._scripts import Scripts

_TAKE_OVER_MAX = 100_000  # most pending entries taken over from one partition at once (a predecessor's read-ahead)


@dataclass(slots=True)
class _Parked:
    """A nacked partition message waiting to be delivered again, and its key's messages fetched since."""

    head: RedisDelivery
    due: float
    behind: list[RedisDelivery] = field(default_factory=list)


class OrderedReceiver(RedisReceiver):
    """A ``RedisReceiver`` that also reads the partitions it holds the lease of, through a ``KeyHold``."""

    def __init__(self, adapter: Link, r: Route) -> None:
        super().__init__(adapter, r)
        self._hold: KeyHold[RedisDelivery] = KeyHold()
        self._parked: dict[str, _Parked] = {}  # key (or entry id when keyless) -> its nacked head
        self._back: deque[RedisDelivery] = deque()  # let through again after a park or a lost lease: returned first
        self._owned: tuple[str, ...] = ()  # partitions whose lease is ours
        self._readable: tuple[str, ...] = ()  # of those, our share: read with XREADGROUP '>'
        self._partitions = frozenset(r.partitions)
        self._leases = [lease_key(p, r.group) for p in r.partitions]
        self._lease_ms = max(1, round(self._options.visibility_timeout * 1000))
        self._start = secrets.randbelow(len(r.partitions))  # where this receiver starts looking for free partitions
        self._next_tidy = 0.0

    def _reading(self, room: int) -> tuple[str, ...]:
        """The endpoint's own streams and every partition of our share, whatever the room: a read of only some of
        them would block on empty ones while others have entries. With less room than streams each gives one
        entry (COUNT is per stream); what ``receive`` cannot return yet waits here, at most one per stream."""
        own, parts = self._route.streams, self._readable
        if not parts:
            return super()._reading(room)
        return own + parts

    def _waiting(self) -> int:
        """Fetched here and not handed out: the read-ahead to bound by ``max_messages``."""
        return len(self._hold) + len(self._back) + sum(len(p.behind) for p in self._parked.values())

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """As ``RedisReceiver.receive``, plus the partition leases each housekeeping round, nacked messages due
        again, and the key's next message once the one before is settled (without waiting for a read to end)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            if self._closed:
                raise ClosedError(f"{self!r} is closed")
            out = self._let_through(max_messages)
            if out:
                return out
            now = loop.time()
            if now >= self._next_housekeeping:
                got = await self._housekeeping(max_messages)
                got += await self._lease_round()
                self._back.extend(self._admit(got))
                now = loop.time()
            self._back.extend(await self._due_again(now))
            out = self._let_through(max_messages)
            if out:
                return out
            room = max_messages - self._waiting()
            busy = bool(self._parked) or self._waiting() > 0
            until = min(deadline, self._next_housekeeping, *(p.due for p in self._parked.values()))
            if room > 0:
                block_ms = int((until - now) * 1000)
                got = await self._read(room, None if busy or block_ms < 1 else block_ms)
                self._back.extend(self._admit(got))
                out = self._let_through(max_messages)
                if out:
                    return out
            if loop.time() >= deadline:
                return []
            if busy:  # a settle may let a held one through: wake up for it rather than block in a read
                await self._hold.wait(max(0.0, min(until, loop.time() + self._options.poll_interval) - loop.time()))

    def _let_through(self, n: int) -> list[Delivery]:
        out: list[Delivery] = []
        while self._back and len(out) < n:
            out.append(self._back.popleft())
        out.extend(self._hold.ready(n - len(out)))
        return out

    def _admit(self, fetched: Iterable[RedisDelivery]) -> list[RedisDelivery]:
        """Through the hold, unless its key is parked: then it waits behind the nacked head."""
        out: list[RedisDelivery] = []
        for d in fetched:
            if d.stream not in self._partitions:  # unkeyed (or keyed by a producer without the option)
                out.append(d)
                continue
            key = d.record.key
            parked = self._parked.get(key) if key is not None else None
            if parked is None:
                out += self._hold.admit((d,))
            elif d.record.id != parked.head.record.id:
                parked.behind.append(d)
        return out

    # -- leases -------------------------------------------------------------------------------------

    async def _lease_round(self) -> list[RedisDelivery]:
        """Renew, hand over and take partition leases; take over what is pending in newly leased partitions."""
        r = self._route
        _, scripts = self._adapter.connected()
        keys = [r.members, *self._leases, *r.partitions]
        args: list[str | int] = [self._consumer, self._lease_ms, r.group, "1", self._start]
        with translated(f"receive from {r.endpoint}", secrets=self._adapter.secrets):
            try:
                result: Any = await scripts.leases(keys=keys, args=args)
            except rx.ResponseError as exc:
                if not is_nogroup(exc):
                    raise
                await self._adapter.create_groups(r.groups, recover=True)
                return []
        share, held = int(result[0]), [r.partitions[int(i) - 1] for i in result[1]]
        lost = set(self._owned) - set(held)
        new = [p for p in held if p not in self._owned]
        self._owned, self._readable = tuple(held), tuple(held[:share])
        if lost:
            self._forget(lost)
        got: list[RedisDelivery] = []
        for p in new:
            got += await self._take_over(scripts, p)
        await self._tidy(scripts)
        return got

    async def _take_over(self, scripts: Scripts, partition: str) -> list[RedisDelivery]:
        r = self._route
        with translated(f"receive from {r.endpoint}", secrets=self._adapter.secrets):
            claimed: Any = await scripts.take_over(keys=[partition], args=[r.group, self._consumer, _TAKE_OVER_MAX])
        return self._deliveries(partition, [(eid, flat, int(n)) for eid, n, flat in claimed])

    async def _tidy(self, scripts: Scripts) -> None:
        """Every ``trim_interval``, one held partition in turn: trim it (a topic's) and prune idle consumer names."""
        now = asyncio.get_running_loop().time()
        if not self._owned or now < self._next_tidy:
            return
        self._next_tidy = now + self._options.trim_interval
        r = self._route
        partition = self._owned[self._turn % len(self._owned)]
        idle_ms = max(1, round(self._options.idle_consumer_timeout * 1000))
        with translated(f"receive from {r.endpoint}", secrets=self._adapter.secrets):
            await scripts.tidy_partition(keys=[partition], args=["0" if r.shared is None else "1", r.group, idle_ms])

    def _forget(self, lost: set[str]) -> None:
        """Leases lost (expired while this receiver was stalled): drop what it fetched of them and did not hand out;
        their new holder has taken those entries over."""
        kept = [d for d in self._hold.drain() if d.stream not in lost]
        for key, parked in list(self._parked.items()):
            if parked.head.stream in lost:
                del self._parked[key]
        back = [d for d in self._back if d.stream not in lost]
        self._back.clear()
        self._back.extend(back + self._hold.admit(kept))

    async def _leave(self, scripts: Scripts) -> None:
        """Give up every lease and leave the members: the next holder takes over what is pending at once."""
        r = self._route
        await scripts.release_leases(keys=[r.members, *self._leases], args=[self._consumer])
        self._owned = self._readable = ()

    async def release(self) -> None:
        """A stopped ``run()``: drop what was fetched and not handed out (it stays pending under this consumer) and
        give up the leases, so the next holder takes it over now. The next ``receive`` joins again."""
        self._hold.drain()
        self._parked.clear()
        self._back.clear()
        if self._closed:
            return
        _, scripts = self._adapter.connected()
        with translated(f"release on {self._route.endpoint}", secrets=self._adapter.secrets):
            await self._leave(scripts)
        self._next_housekeeping = 0.0

    # -- settling -------------------------------------------------------------------------------------

    async def _due_again(self, now: float) -> list[RedisDelivery]:
        """Deliver the parked heads whose delay is over again (counted), each followed by what waited behind it."""
        due = [key for key, p in self._parked.items() if p.due <= now]
        if not due:
            return []
        parked = [self._parked.pop(key) for key in due]
        by_stream: dict[str, list[bytes]] = {}
        for p in parked:
            by_stream.setdefault(p.head.stream, []).append(p.head.rid)
        _, scripts = self._adapter.connected()
        fresh: dict[tuple[str, bytes], RedisDelivery] = {}
        r = self._route
        for stream, ids in by_stream.items():
            with translated(f"receive from {r.endpoint}", secrets=self._adapter.secrets):
                claimed: Any = await scripts.redeliver(keys=[stream], args=[r.group, self._consumer, *ids])
            got = self._deliveries(stream, [(eid, flat, int(n)) for eid, n, flat in claimed])
            fresh.update(((d.stream, d.rid), d) for d in got)
        out: list[RedisDelivery] = []
        for p in parked:
            again = fresh.get((p.head.stream, p.head.rid))
            out += self._admit([*([again] if again is not None else []), *p.behind])
        return out

    def _park(self, d: RedisDelivery, delay: float | None) -> None:
        """``d`` goes back: it stays pending here and is delivered again after ``delay``; its key waits for it."""
        behind = self._hold.released(d)
        due = asyncio.get_running_loop().time() + (delay or 0.0)
        key = d.record.key if d.record.key is not None else f"\0{d.rid.decode()}"
        self._parked[key] = _Parked(d, due, behind)

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """XACK (+ XDEL) as unordered; then each key's next message may go out. A failed ack parks the key: the
        message is delivered again unless the ack went through after all."""
        try:
            await super().ack_many(deliveries)
        except BaseException:
            for d in deliveries:
                if isinstance(d, RedisDelivery) and d.stream in self._partitions:
                    self._park(d, None)
            raise
        for d in deliveries:
            if isinstance(d, RedisDelivery):
                self._hold.settled(d)

    async def _nack(self, d: RedisDelivery, delay: float | None) -> None:
        if d.stream not in self._partitions:
            await super()._nack(d, delay)
            return
        self._park(d, delay)

    async def _dead_letter(self, d: RedisDelivery, reason: str) -> None:
        await super()._dead_letter(d, reason)
        self._hold.settled(d)

    async def _extend(self, d: RedisDelivery) -> None:
        """A partition message: renew its partition's lease (which is what keeps it ours); others as unordered."""
        if d.stream not in self._partitions:
            await super()._extend(d)
            return
        _, scripts = self._adapter.connected()
        lease = lease_key(d.stream, self._route.group)
        with translated(f"extend lock on {self._route.endpoint}", secrets=self._adapter.secrets):
            await scripts.renew_lease(keys=[lease], args=[self._consumer, self._lease_ms])
