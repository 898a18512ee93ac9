"""Receiving: one aiokafka consumer per receiver (a group member), read-ahead, per-key order, and the commits
whose metadata carries what is settled beyond a partition's committed offset (see ``_adapter``'s docstring).
The receiver holds a ``Link`` to its adapter (settings, the admin client, the send for dead letters), not the
adapter itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import (
    AIOKafkaConsumer,
    ConsumerRebalanceListener,
    TopicPartition,
)
from aiokafka import errors as kx
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import OffsetAndMetadata

from msgbus.adapter import (
    PREFETCH_BYTES,
    Delivery,
    Endpoint,
    Receiver,
    Record,
    dead_letter_record,
    wait_set,
)
from msgbus.errors import ClosedError, MsgbusError

from . import _codec
from ._config import KafkaOptions
from ._errors import convert, translated
from ._names import dead_letters_of, group_of, topic_of

log = logging.getLogger("msgbus.kafka")


class Link(Protocol):
    """What a receiver needs from its adapter: the settings, the admin client, and the send for dead letters."""

    options: KafkaOptions

    @property
    def admin(self) -> AIOKafkaAdminClient: ...

    async def send(self, endpoint: Endpoint, records: Sequence[Record], delay: float | None = None) -> None: ...

    def forget(self, receiver: KafkaReceiver) -> None: ...


async def close_quietly(*closers: Any) -> None:
    """Await each closer, logging (not raising) what fails."""
    for closer in closers:
        try:
            await closer
        except Exception as exc:  # closing a half-open client must not hide the real error
            log.debug("msgbus kafka: ignored while closing: %r", exc)


_FETCHED, _DELIVERED, _WAITING, _DONE = range(4)

#: Bytes (keys and values) a receiver reads ahead at most, besides its ``3 * prefetch`` records: with large
#: records the byte bound comes first. One fetch may pass it (by at most what aiokafka fetched in one go).
#: Entries waiting for their commit note are a subset of these, so the notes' buffer is bounded too.
READ_AHEAD_BYTES = PREFETCH_BYTES  # the kit's bound on what a consumer holds


def _size(raw: Any) -> int:
    """What a fetched record holds, in bytes, for the read-ahead bound."""
    return len(raw.value or b"") + len(raw.key or b"")


@dataclass(eq=False, slots=True)
class _Entry:
    tp: TopicPartition
    offset: int
    record: Record
    raw: Any
    attempts: int  # deliveries so far (of this partition's current and earlier owners)
    epoch: int  # the receiver's assignment epoch when fetched: stale after a revocation
    state: int = _FETCHED
    locked_until: float = 0.0
    note: int = 0  # the attempt count the commit metadata is to claim for it (see ``_note_ahead``)
    noted: int = 0  # the claim a completed commit holds: it may be handed out while ``attempts < noted``
    size: int = 0  # bytes of key and value, counted against ``READ_AHEAD_BYTES`` while read ahead


@dataclass(eq=False, slots=True)
class _Partition:
    """What this receiver knows of one assigned partition."""

    order: deque[int] = field(default_factory=deque)  # fetched, not yet committed offsets in order
    entries: dict[int, _Entry] = field(default_factory=dict)  # unsettled fetched entries
    settled: set[int] = field(default_factory=set)  # settled offsets still in ``order``
    skip: set[int] = field(default_factory=set)  # settled by an earlier owner, not fetched yet
    prior: dict[int, int] = field(default_factory=dict)  # delivered by an earlier owner, not fetched yet
    next_offset: int | None = None  # the offset after the last fetched one
    # Offsets from ``next_offset`` up to this one are claimed as delivered once in the last stored commit (its
    # pre-notes, see ``_commit``): a record fetched there is handed out without waiting for a note of its own.
    noted_to: int = 0
    committed: int | None = None
    dirty: bool = False
    revoking: bool = False
    loading: list[Any] | None = None  # records fetched while the previous owner's notes load (None: loaded)


class KafkaDelivery(Delivery):
    """A record of one partition, settled through the receiver that fetched it."""

    __slots__ = ("_entry", "_receiver")

    def __init__(self, receiver: KafkaReceiver, entry: _Entry) -> None:
        super().__init__(entry.record, entry.attempts, entry.raw)
        self._receiver = receiver
        self._entry = entry

    async def ack(self) -> None:
        self._receiver._settle(self._entry)

    async def nack(self, delay: float | None = None) -> None:
        self._receiver._nack(self._entry, delay)

    async def dead_letter(self, reason: str) -> None:
        receiver = self._receiver
        if not receiver._current(self._entry):
            return  # the partition moved on: its next owner redelivers the record
        source = Endpoint(receiver.endpoint.kind, receiver.endpoint.name, receiver.endpoint.subscription)
        dead = dead_letter_record(self._entry.record, reason, self._entry.attempts, source)
        try:
            await receiver.adapter.send(dead_letters_of(receiver.endpoint), [dead])
        except BaseException:
            # Not dead-lettered, so not settled: it comes back at once (attempt + 1, its key still first in
            # line), rather than staying delivered, holding its key and its partition's commit, until a rebalance.
            receiver._nack(self._entry, None)
            raise
        receiver._settle(self._entry)

    async def extend(self, seconds: float) -> None:
        self._receiver._touch()
        self._entry.locked_until = max(self._entry.locked_until, time.monotonic() + seconds)


class KafkaReceiver(Receiver, ConsumerRebalanceListener):  # type: ignore[misc]
    """One group member. Reads up to ``3 * prefetch`` records ahead of what it has handed out (see ``_run_pump``).

    A receiver that neither receives nor extends a delivery for ``visibility_timeout`` seconds leaves its
    group (Kafka's max.poll.interval, with ``extend`` counting as a poll), so a stalled holder cannot keep
    partitions from the group; its unsettled deliveries then go to the partitions' next owners. On a
    rebalance it first waits, up to ``rebalance_timeout``, for its delivered records to be settled or
    their locks to expire, then commits.
    """

    def __init__(self, adapter: Link, endpoint: Endpoint, prefetch: int) -> None:
        self.adapter = adapter
        self.endpoint = endpoint
        self.prefetch = prefetch
        self.topic = topic_of(endpoint)
        self.group = group_of(endpoint, adapter.options.group_prefix)
        self._o = adapter.options
        self._consumer: AIOKafkaConsumer | None = None
        self._parts: dict[TopicPartition, _Partition] = {}
        self._ready: deque[_Entry] = deque()
        self._keys: dict[tuple[TopicPartition, str], deque[_Entry]] = {}  # held keys -> their waiting records
        self._ahead = 0  # fetched entries not handed out yet (the core bounds those handed out by ``prefetch``)
        self._ahead_bytes = 0  # their keys and values (see ``READ_AHEAD_BYTES``)
        self._epoch = 0
        self._changed = asyncio.Event()  # room freed, records to note, a partition released: wakes the pump
        self._arrived = asyncio.Event()  # records noted and ready (or the pump stopped): wakes ``receive``
        self._to_note: list[_Entry] = []  # fetched or requeued entries whose next attempt is not noted yet
        self._pump: asyncio.Task[None] | None = None
        self._error: Exception | None = None  # a fetch failure, raised by the next ``receive``
        self._fetch: asyncio.Task[dict[TopicPartition, list[Any]]] | None = None
        self._commit_lock = asyncio.Lock()
        self._membership = asyncio.Lock()  # joining and leaving take turns: a leave must not drop a new join's parts
        self._committer: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._last_active = time.monotonic()
        self._receiving = 0
        self._closed = False
        self._timers: set[asyncio.TimerHandle] = set()

    def __repr__(self) -> str:
        return f"KafkaReceiver({self.topic!r}, group={self.group!r})"

    # --- membership ---

    async def _join(self) -> AIOKafkaConsumer:
        if self._consumer is not None:
            return self._consumer
        async with self._membership:
            if self._consumer is not None:
                return self._consumer
            return await self._join_locked()

    async def _join_locked(self) -> AIOKafkaConsumer:
        o = self._o
        consumer = AIOKafkaConsumer(
            **o.client_kwargs(),
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(o.session_timeout * 1000),
            heartbeat_interval_ms=int(o.heartbeat_interval * 1000),
            rebalance_timeout_ms=int(o.rebalance_timeout * 1000),
            # Liveness is the heartbeat plus this receiver's own watchdog (receive or extend counts).
            max_poll_interval_ms=24 * 3600 * 1000,
            max_partition_fetch_bytes=max(1_048_576, o.max_message_size + 64 * 1024),
        )
        consumer.subscribe([self.topic], listener=self)
        with translated(f"join group {self.group!r}", secrets=[o.password]):
            await consumer.start()
        self._consumer = consumer
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_loop(), name=f"msgbus-kafka-commit-{self.group}")
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._watch(), name=f"msgbus-kafka-watch-{self.group}")
        return consumer

    async def _leave(self) -> None:
        """Commit what is settled (and the attempts of what is not), then leave the group."""
        async with self._membership:
            consumer, self._consumer = self._consumer, None
            if consumer is None:
                return
            tasks = [t for t in (self._pump, self._fetch) if t is not None]
            self._pump = self._fetch = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._release(list(self._parts), wait=False, consumer=consumer)
            await close_quietly(consumer.stop())

    async def release(self) -> None:
        """Leave the group (commit what is settled, drop the read-ahead), so the partitions and everything
        fetched but not handed out go to the other members now; the next ``receive`` joins again."""
        if not self._closed:
            await self._leave()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """aiokafka calls this before a rebalance: settle what we can, commit, forget the partitions."""
        if self._consumer is not None:
            await self._release([tp for tp in revoked if tp in self._parts], wait=not self._closed)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Load the notes the previous owner left in the commit metadata: settled offsets and attempts.

        aiokafka fetches for the new assignment before this returns, so the partitions are ours at once;
        what arrives while the notes load waits in ``loading`` (aiokafka will not fetch it again).
        """
        self._forget(assigned)  # left over from an assignment whose revocation we did not see
        for tp in assigned:
            self._parts[tp] = _Partition(loading=[])
        notes: dict[TopicPartition, Any] = {}
        if assigned:
            try:
                notes = await self.adapter.admin.list_consumer_group_offsets(self.group, partitions=list(assigned))
            except Exception as exc:  # without notes we redeliver settled records: at-least-once still holds
                log.warning("msgbus kafka: could not read commit notes of %s: %r", self.group, exc)
        for tp in assigned:
            part = self._parts.get(tp)
            if part is None or part.loading is None:
                continue  # revoked while the notes loaded
            meta = notes.get(tp)
            parsed = _codec.decode_notes(meta.metadata if meta is not None else None)
            part.skip, part.prior = set(parsed.settled), dict(parsed.attempts)
            part.committed = meta.offset if meta is not None and meta.offset >= 0 else None
            early, part.loading = part.loading, None
            self._ahead -= len(early)
            self._ahead_bytes -= sum(_size(r) for r in early)
            self._accept_records(tp, part, early)
        self._changed.set()

    async def _release(
        self, tps: list[TopicPartition], *, wait: bool, consumer: AIOKafkaConsumer | None = None
    ) -> None:
        if not tps:
            return
        parts = {tp: self._parts[tp] for tp in tps}
        for part in parts.values():
            part.revoking = True
        self._drop_undelivered(set(tps))
        deadline = time.monotonic() + self._o.rebalance_timeout * 0.8
        while wait and time.monotonic() < deadline:
            now = time.monotonic()
            busy = [e for p in parts.values() for e in p.entries.values() if e.state != _FETCHED]
            locked = [e for e in busy if e.locked_until > now]
            if not locked:
                break
            until = min(min(e.locked_until for e in locked), deadline) - now
            self._changed.clear()
            await wait_set(self._changed, max(until, 0.01))
        await self._commit(tps, consumer=consumer, exact=True)
        self._epoch += 1
        self._forget({tp for tp, part in parts.items() if self._parts.get(tp) is part})
        self._changed.set()

    def _forget(self, tps: set[TopicPartition]) -> None:
        """Drop everything held for ``tps`` (their next owners redeliver what was not committed)."""
        gone = {tp for tp in tps if tp in self._parts}
        if not gone:
            return
        for tp in gone:
            part = self._parts.pop(tp)
            fetched = [e for e in part.entries.values() if e.state == _FETCHED]
            self._ahead -= len(fetched) + len(part.loading or ())
            self._ahead_bytes -= sum(e.size for e in fetched) + sum(_size(r) for r in part.loading or ())
            for entry in part.entries.values():
                entry.state = _DONE
        for key in [k for k in self._keys if k[0] in gone]:
            del self._keys[key]
        self._ready = deque(e for e in self._ready if e.tp not in gone)

    def _drop_undelivered(self, tps: set[TopicPartition]) -> None:
        """Records fetched but never delivered go back to Kafka: the committed offset stops at the first of
        them, and the partition's next owner fetches them again. Nacked records stay, to be redelivered."""
        self._ready = deque(e for e in self._ready if e.tp not in tps or e.state == _WAITING)
        for key, waiting in self._keys.items():
            if key[0] in tps:
                waiting.clear()
        for tp in tps:
            part = self._parts[tp]
            for offset, entry in list(part.entries.items()):
                if entry.state == _FETCHED:
                    del part.entries[offset]
                    self._ahead -= 1
                    self._ahead_bytes -= entry.size
                    if entry.attempts:  # an earlier owner's count: the next owner carries it on
                        part.prior[offset] = entry.attempts

    async def _watch(self) -> None:
        """Leave the group when nobody received or extended for ``visibility_timeout`` (see class doc)."""
        period = max(self._o.visibility_timeout / 4, 0.05)
        while not self._closed:
            await asyncio.sleep(period)
            idle = time.monotonic() - self._last_active
            if self._consumer is not None and self._receiving == 0 and idle > self._o.visibility_timeout:
                log.debug("msgbus kafka: %r idle for %.1fs: leaving the group", self, idle)
                await self._leave()

    def _touch(self) -> None:
        self._last_active = time.monotonic()

    # --- receiving ---

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        if self._closed:
            raise ClosedError(f"{self!r} is closed")
        self._receiving += 1
        self._touch()
        try:
            return await self._receive(max_messages, timeout)
        finally:
            self._receiving -= 1
            self._touch()

    async def _receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        consumer = await self._join()
        if self._pump is None:
            self._pump = asyncio.create_task(self._run_pump(consumer), name=f"msgbus-kafka-pump-{self.group}")
            self._pump.add_done_callback(lambda _: self._arrived.set())
        deadline = time.monotonic() + timeout
        while True:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self._pump is not None and self._pump.done():
                pump, self._pump = self._pump, None  # the next receive starts a new one
                exc = None if pump.cancelled() else pump.exception()
                if exc is not None:
                    raise convert(exc, f"fetch from {self.topic!r}", secrets=[self._o.password]) from exc
            taken = self._take(max_messages)
            if taken:
                return [KafkaDelivery(self, e) for e in taken]
            left = deadline - time.monotonic()
            if left <= 0 or self._closed or self._pump is None:
                return []
            self._arrived.clear()
            await wait_set(self._arrived, left)

    async def _run_pump(self, consumer: AIOKafkaConsumer) -> None:
        """Fetch ahead of ``receive`` and note each record's next attempt while the handlers work, so
        ``receive`` hands out records whose attempt counts are already committed, without waiting for it.

        It reads up to three credits (``3 * prefetch``) beyond what it has handed out. A note is a commit,
        and Kafka's group coordinator lingers 5 ms before writing one: while one batch is noted, the next
        accumulates and the one before waits for ``receive``, and none takes the credit of those being handled.
        """
        getmany = consumer.getmany
        noting: asyncio.Task[None] | None = None
        try:
            while not self._closed:
                if self._consumer is not consumer:
                    return  # left the group (``_leave`` cancels us too)
                room = 3 * self.prefetch - self._ahead
                if room > 0 and self._ahead and self._ahead_bytes >= READ_AHEAD_BYTES:
                    room = 0  # large records: the byte bound is reached before the count
                if self._fetch is None and room > 0:
                    self._fetch = asyncio.ensure_future(getmany(timeout_ms=500, max_records=room))
                if noting is None and self._to_note:
                    noting = asyncio.create_task(self._note_ahead())
                self._changed.clear()
                changed = asyncio.ensure_future(self._changed.wait())
                waiting = [f for f in (changed, self._fetch, noting) if f is not None]
                try:
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if noting is not None and noting.done():
                    done, noting = noting, None
                    done.result()
                if self._fetch is not None and self._fetch.done():
                    fetch, self._fetch = self._fetch, None
                    try:
                        with translated(f"fetch from {self.topic!r}", secrets=[self._o.password]):
                            self._accept(fetch.result())
                    except MsgbusError as err:
                        self._error = err
                        self._arrived.set()
                        await asyncio.sleep(0.5)  # aiokafka retries connections itself; do not spin on a hard error
        finally:
            if noting is not None:
                noting.cancel()
                await asyncio.gather(noting, return_exceptions=True)

    async def _note_ahead(self) -> None:
        """Commit the next attempt count of every entry waiting for its note, then let ``receive`` have them.

        An entry counts as delivered once its note is written: after a crash its next owner starts it at
        attempt n+1 even if no handler saw it yet (as a broker counts a prefetched message as received).
        A graceful hand-over writes exact counts instead (``_release``).
        """
        entries, self._to_note = self._to_note, []
        claims: list[tuple[_Entry, int]] = []
        for entry in entries:
            part = self._parts.get(entry.tp)
            if part is None or part.entries.get(entry.offset) is not entry or entry.epoch != self._epoch:
                continue  # settled, dropped or handed over meanwhile
            if entry.state in (_FETCHED, _WAITING):
                entry.note = entry.attempts + 1
                part.dirty = True
                claims.append((entry, entry.note))
        if not claims:
            return
        durable = await self._commit(list({e.tp for e, _ in claims}))
        failed: list[_Entry] = []
        for entry, note in claims:
            if entry.tp in durable:
                entry.noted = max(entry.noted, note)
            else:
                failed.append(entry)
        if len(failed) < len(claims):
            self._arrived.set()
        if failed:
            self._to_note.extend(failed)
            await asyncio.sleep(self._o.commit_interval or 0.05)  # the commit failed (logged): retry shortly

    def _accept(self, batches: dict[TopicPartition, list[Any]]) -> None:
        for tp, raws in batches.items():
            part = self._parts.get(tp)
            if part is None or part.revoking:
                # Being handed over: the next owner fetches from our commit. Still assigned but unknown to us
                # (never expected): rewind, so nothing aiokafka hands us is skipped.
                consumer = self._consumer
                if part is None and raws and consumer is not None and tp in consumer.assignment():
                    log.warning("msgbus kafka: records of unexpected partition %s; rewinding to %d", tp, raws[0].offset)
                    consumer.seek(tp, raws[0].offset)
                continue
            if part.loading is not None:
                part.loading.extend(raws)
                self._ahead += len(raws)  # they count against the read-ahead while they wait
                self._ahead_bytes += sum(_size(r) for r in raws)
                continue
            self._accept_records(tp, part, raws)

    def _accept_records(self, tp: TopicPartition, part: _Partition, raws: list[Any]) -> None:
        for raw in raws:
            offset = raw.offset
            if part.next_offset is not None and offset < part.next_offset:
                continue  # already fetched (a re-fetch after a seek)
            part.next_offset = offset + 1
            part.order.append(offset)
            if offset in part.skip:
                part.skip.discard(offset)
                part.settled.add(offset)
                part.dirty = True
                continue
            record = _codec.decode(
                raw.value, raw.key, raw.headers or (), raw.timestamp, f"{tp.topic}-{tp.partition}-{offset}"
            )
            entry = _Entry(tp, offset, record, raw, part.prior.pop(offset, 0), self._epoch, size=_size(raw))
            part.entries[offset] = entry
            self._ahead += 1
            self._ahead_bytes += entry.size
            if not entry.attempts and offset < part.noted_to:
                entry.note = entry.noted = 1  # pre-noted: deliverable now, no commit between fetch and handler
                if self._route(entry):
                    self._arrived.set()
                if part.noted_to - part.next_offset < self.prefetch // 2:
                    part.dirty = True  # the commit loop extends the pre-notes before they run out
            elif self._route(entry) or not entry.attempts:
                self._to_note.append(entry)
            # else: an earlier owner delivered it and it waits behind its key (maybe behind the record that
            # killed that owner): noted when its key frees, so each crash does not count it again (_settle)

    def _route(self, entry: _Entry) -> bool:
        """Deliverable now (True), or behind an unsettled record of the same key."""
        key = entry.record.key
        if key is None:
            self._ready.append(entry)
            return True
        waiting = self._keys.get((entry.tp, key))
        if waiting is None:
            self._keys[(entry.tp, key)] = deque()
            self._ready.append(entry)
            return True
        waiting.append(entry)
        return False

    def _take(self, n: int) -> list[_Entry]:
        out: list[_Entry] = []
        now = time.monotonic()
        while self._ready and len(out) < n:
            entry = self._ready[0]
            part = self._parts.get(entry.tp)
            if part is None or entry.epoch != self._epoch or entry.state == _DONE:
                self._ready.popleft()
                continue
            if entry.noted <= entry.attempts:
                break  # its note is being written; the records behind it wait their turn
            self._ready.popleft()
            if entry.state == _FETCHED:
                self._ahead -= 1
                self._ahead_bytes -= entry.size
            entry.state = _DELIVERED
            entry.attempts += 1
            entry.locked_until = now + self._o.visibility_timeout
            out.append(entry)
        return out

    # --- settling ---

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Settle each in memory; the commit loop writes the offsets (no coroutine per record)."""
        for d in deliveries:
            if isinstance(d, KafkaDelivery) and d._receiver is self:
                self._settle(d._entry)
            else:
                await d.ack()

    async def flush(self) -> None:
        """Commit what is settled now, rather than at the next ``commit_interval``."""
        await self._commit([tp for tp, p in self._parts.items() if p.dirty])

    def _current(self, entry: _Entry) -> bool:
        return not self._closed and entry.epoch == self._epoch and entry.state in (_DELIVERED, _WAITING)

    def _settle(self, entry: _Entry) -> None:
        if not self._current(entry):
            return  # settled already, or the partition was handed over (its next owner redelivers)
        part = self._parts[entry.tp]
        entry.state = _DONE
        del part.entries[entry.offset]
        part.settled.add(entry.offset)
        part.dirty = True
        key = entry.record.key
        if key is not None:
            waiting = self._keys.get((entry.tp, key))
            if waiting:
                following = waiting.popleft()
                self._ready.append(following)
                if following.noted <= following.attempts and following not in self._to_note:
                    self._to_note.append(following)  # not noted while it waited (_accept_records)
                self._arrived.set()
            else:
                self._keys.pop((entry.tp, key), None)
        self._changed.set()

    def _nack(self, entry: _Entry, delay: float | None) -> None:
        if not self._current(entry):
            return
        entry.state = _WAITING
        if not delay or delay <= 0:
            self._requeue(entry)
            return
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def fire() -> None:
            self._timers.discard(timer)
            self._requeue(entry)

        timer = loop.call_later(delay, fire)
        self._timers.add(timer)

    def _requeue(self, entry: _Entry) -> None:
        if entry.epoch == self._epoch and entry.state == _WAITING:
            entry.locked_until = time.monotonic() + self._o.visibility_timeout
            self._ready.appendleft(entry)  # first in line: its key is held until it is settled
            self._to_note.append(entry)
            self._changed.set()

    # --- committing ---

    async def _commit_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._o.commit_interval or 0.05)
            if any(p.dirty for p in self._parts.values()):
                await self._commit([tp for tp, p in self._parts.items() if p.dirty])

    async def _commit(
        self, tps: list[TopicPartition], *, consumer: AIOKafkaConsumer | None = None, exact: bool = False
    ) -> set[TopicPartition]:
        """Commit the offsets and notes of the dirty ones of ``tps``; returns those whose notes are now stored.

        Notes claim each entry's next attempt where ``_note_ahead`` asked for it; ``exact`` (a hand-over)
        writes the attempts actually delivered.
        """
        consumer = consumer or self._consumer
        if consumer is None:
            return set()
        async with self._commit_lock:
            stored: set[TopicPartition] = set()
            offsets: dict[TopicPartition, OffsetAndMetadata] = {}
            ahead: dict[TopicPartition, int] = {}  # the pre-notes each commit writes
            for tp in tps:
                part = self._parts.get(tp)
                if part is None:
                    continue
                if not part.dirty and not (exact and part.noted_to):  # a hand-over takes back its pre-notes
                    stored.add(tp)  # the last commit (done: we hold the lock) had everything
                    continue
                while part.order and part.order[0] in part.settled:
                    part.settled.discard(part.order.popleft())
                position = part.order[0] if part.order else part.next_offset
                if position is None:
                    position = part.committed
                if position is None:
                    continue
                attempts = {o: n for o, n in part.prior.items() if o >= position}
                for o, e in part.entries.items():
                    n = e.attempts if exact else max(e.attempts, e.note)
                    if n:
                        attempts[o] = n
                claims = range(0)
                if not exact and part.next_offset is not None:
                    # Pre-notes: the next ``prefetch`` offsets, not fetched yet, as delivered once, so the records
                    # that arrive there are handed out at once (one record's latency without a commit's). After
                    # a crash they count one attempt, like records read ahead (an earlier owner's higher count
                    # wins); a hand-over (exact) drops them.
                    claims = range(part.next_offset, part.next_offset + self.prefetch)
                    ahead[tp] = claims.stop
                settled = {o for o in part.settled | part.skip if o >= position}
                notes = _codec.encode_notes(settled, attempts, ahead=claims)
                offsets[tp] = OffsetAndMetadata(position, notes)
                part.dirty = False
            if not offsets:
                return stored
            try:
                await consumer.commit(offsets)
            except BaseException as exc:
                for tp in offsets:
                    part = self._parts.get(tp)
                    if part is not None:
                        part.dirty = True
                if not isinstance(exc, (TimeoutError, kx.KafkaError, OSError)):
                    raise
                # A rebalance or an outage: the next owner redelivers what we could not note (at-least-once).
                log.info("msgbus kafka: commit for %s failed (%r); will retry", self.group, exc)
                return stored
            for tp, meta in offsets.items():
                part = self._parts.get(tp)
                if part is not None:
                    part.committed = meta.offset
                    part.noted_to = ahead.get(tp, 0) if exact else max(part.noted_to, ahead.get(tp, 0))
            return stored | set(offsets)

    async def close(self) -> None:
        if self._closed:
            return
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        try:
            await self._leave()
        finally:
            self._closed = True
            for task in (self._committer, self._watchdog):
                if task is not None and task is not asyncio.current_task():
                    task.cancel()
            self._changed.set()
            self.adapter.forget(self)
