"""The consumer's inbox: what ``Consumer`` and the ``run()`` runtime share, and nothing else.

It holds the messages fetched but not handed out yet (``buffer``), counts those held unsettled against
``prefetch`` (``Message`` tells it when one is settled), and batches the acks of handled messages. The
prefetch limit is the inbox's alone: it asks the receiver for at most the free room (``room``), and receivers
return what they are asked for without counting it again. The runtime
(``_runtime``, ``_redelivery``) works on the inbox only, never on the consumer: take, ack, release, drain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._capabilities import Capabilities
from ._message import Message
from ._waits import wait_set
from .adapter import PREFETCH_BYTES, Adapter, Delivery, Endpoint, Receiver
from .errors import MsgbusError

if TYPE_CHECKING:
    from ._telemetry import Telemetry

log = logging.getLogger("msgbus")

T = TypeVar("T")

FIRST_FETCH = 16  # messages ``take`` asks for while their size is unknown (the byte bound counts with a size)
REMEMBERED = 10_000  # nacked ids an inbox remembers; forgetting one only costs its retry running alone

#: One receive call on the backend, returning decoded messages: ``(max_messages, timeout) -> messages``.
Fetch = Callable[[int, float], Awaitable[list[Message[T]]]]
#: Send a reply to a received request (``Message.reply``): ``(request, body, headers)``; the bus's ``_reply``.
Reply = Callable[[Message[Any], object, Mapping[str, str] | None], Awaitable[None]]


class Inbox(Generic[T]):
    """The buffer, the unsettled count and the batched acks of one consumer. Task-safe within one event loop."""

    def __init__(
        self, adapter: Adapter, endpoint: Endpoint, prefetch: int | None, fetch: Fetch[T], reply: Reply
    ) -> None:
        self.adapter = adapter
        self.reply = reply
        self.endpoint = endpoint
        self.prefetch = prefetch  # set when the receiver starts, if the user did not
        self.fetch = fetch
        self.receiver: Receiver | None = None  # set by the consumer when it starts receiving
        self.telemetry: Telemetry | None = None  # the bus's, set by the consumer on each receive call
        self.buffer: deque[Message[T]] = deque()
        self.unsettled = 0  # messages handed out by ``fetch`` and not settled yet
        self.held_bytes = 0  # their bodies' bytes, bounded by ``PREFETCH_BYTES``
        self.mean_size = 0  # bytes per body in the last fetch (0: none yet), to turn the byte room into a count
        self.nacked: dict[str, int] = {}  # id -> the attempt this consumer nacked it at (``_redelivery``)
        self.lock = asyncio.Lock()  # one ``fetch`` at a time
        self.closed = False
        self.failing = False  # the last receive call of ``take`` failed (``Consumer.ready``)
        self._acks: list[Delivery] = []
        self._acks_since = 0.0  # monotonic time the oldest of ``_acks`` was added
        self._durable_at = 0.0  # monotonic time of the last ``acks_durable``
        self._ack_flush: asyncio.Task[None] | None = None
        self._ack_taken: asyncio.Event | None = None  # set each time the flush takes a batch (``send_acks``)
        self._freed: asyncio.Event | None = None  # set by a settlement while ``room`` waits for one

    @property
    def capabilities(self) -> Capabilities:
        """The backend's capabilities (read each time: an adapter may refine them when it opens)."""
        return self.adapter.capabilities

    def settled(self, msg: Message[Any], *, nacked: bool = False) -> None:
        """``msg`` was settled: it no longer counts against ``prefetch`` (``Message`` calls this once). A nacked
        one is remembered: its redelivery is a retry, whether the runtime or the handler itself nacked it."""
        self.unsettled -= 1
        self.held_bytes = self.held_bytes - len(msg._delivery.record.body) if self.unsettled else 0
        if nacked:
            if len(self.nacked) >= REMEMBERED:
                self.nacked.clear()
            self.nacked[msg.id] = msg.attempt
        if self._freed is not None:
            self._freed.set()

    async def room(self, wanted: int, timeout: float) -> tuple[int, float]:
        """How many messages may be fetched now (at most ``wanted``) without holding more than ``prefetch``
        unsettled, nor (at the last fetch's mean size) more than ``PREFETCH_BYTES`` of bodies, and the seconds
        left of ``timeout``. With no room, waits up to ``timeout`` seconds for a settlement; ``(0, 0.0)`` if none
        came (or the inbox was closed). At least one message fits when none is held, however large."""
        assert self.prefetch is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (free := self._free()) <= 0:
            left = deadline - loop.time()
            if left <= 0 or self.closed:
                return 0, 0.0
            if self._freed is None:
                self._freed = asyncio.Event()
            self._freed.clear()
            await wait_set(self._freed, left)
        return min(wanted, free), max(0.0, deadline - loop.time())

    def _free(self) -> int:
        """Messages that fit now, by count and by bytes."""
        assert self.prefetch is not None
        free = self.prefetch - self.unsettled
        if free <= 0:
            return free
        if not self.mean_size:
            return free  # ``take`` asks for FIRST_FETCH until a size is known; ``receive(n)`` gets its n
        if not self.unsettled:
            return max(1, min(free, PREFETCH_BYTES // self.mean_size))
        return min(free, (PREFETCH_BYTES - self.held_bytes) // self.mean_size)

    def held(self, msgs: list[Message[T]]) -> None:
        """``msgs`` were just fetched: they count against ``prefetch`` and ``PREFETCH_BYTES`` until settled."""
        if msgs:
            size = sum(len(m._delivery.record.body) for m in msgs)
            self.unsettled += len(msgs)
            self.held_bytes += size
            self.mean_size = max(1, size // len(msgs))

    async def take(self, stop: asyncio.Event, until: float | None = None) -> Message[T] | None:
        """The next message, fetching a batch when the buffer is empty; ``None`` once stopped or closed, or once
        the loop's clock reaches ``until`` (a batch being gathered, ``_runtime``)."""
        failures = 0
        wait = 0.25
        while not stop.is_set() and not self.closed:
            if self.buffer:
                return self.buffer.popleft()
            if until is None:
                await self.lock.acquire()
            else:
                if (wait := until - asyncio.get_running_loop().time()) <= 0:
                    return None
                try:  # not past ``until`` behind other workers' fetches: what they get lands in the buffer
                    async with asyncio.timeout(min(0.25, wait)):
                        await self.lock.acquire()
                except TimeoutError:
                    continue
                wait = min(0.25, until - asyncio.get_running_loop().time())
            try:
                if self.buffer or stop.is_set() or self.closed or wait <= 0:
                    continue
                try:
                    batch = await self.fetch(self.prefetch or 16 if self.mean_size else FIRST_FETCH, wait)
                except MsgbusError as err:
                    if not err.retryable:
                        raise
                    failures += 1
                    self.failing = True
                    delay = min(5.0, 0.1 * 2**failures, wait if until is not None else 5.0)
                    log.warning("msgbus: receive from %s failed (%s); retrying in %.1fs", self.endpoint, err, delay)
                    await asyncio.sleep(delay)
                    continue
                failures = 0
                self.failing = False
                self.buffer.extend(batch)
            finally:
                self.lock.release()
        return None

    async def top_up(self, timeout: float) -> None:
        """Add what the backend has ready to the buffer, waiting up to ``timeout`` seconds (within prefetch)."""
        if self.prefetch is None or self.unsettled >= self.prefetch or self.closed:
            return
        async with self.lock:
            try:
                self.buffer.extend(await self.fetch(self.prefetch, timeout))
            except MsgbusError as err:
                log.debug("msgbus: topping up %s failed: %s", self.endpoint, err)

    def ack_soon(self, msg: Message[Any]) -> None:
        """Ack without waiting: acks that pile up while one batch is in flight go out as the next batch."""
        if not msg.settled:  # ``msg._settle()``, inlined: this runs once per handled message
            msg.settled = True
            self.settled(msg)
            if not self._acks:
                self._acks_since = time.monotonic()
            self._acks.append(msg._delivery)
            if self._ack_flush is None:
                self._ack_flush = asyncio.get_running_loop().create_task(self._flush_acks())

    def acks_overdue(self, batch: int, delay: float) -> bool:
        """Whether ``send_acks`` has something to do: a ``batch``-th ack waits (one turn of the loop per batch),
        ``8 * batch`` wait, or the oldest has waited ``delay`` seconds. Asked once per handled message: cheap."""
        n = len(self._acks)
        return n > 0 and (n % batch == 0 or n >= 8 * batch or time.monotonic() - self._acks_since >= delay)

    async def send_acks(self, batch: int, delay: float) -> None:
        """Let the acks waiting now go to the backend. Under ``delay`` seconds old: one turn of the loop (the
        flush takes them at once if no batch is in flight; a handler that never awaits gives it no other turn),
        waiting only once ``8 * batch`` pile up. Older: wait until the flush has taken them, after the batch in
        flight; and where the backend holds acks before they are durable (``capabilities.ack_delay``, Kafka's
        commits), until they are durable, at most once per ack_delay.
        """
        late = time.monotonic() - self._acks_since >= delay
        if not late and len(self._acks) < 8 * batch:
            if self._acks and len(self._acks) % batch == 0:  # a turn per batch, not per message, while one is in flight
                await asyncio.sleep(0)
            return
        waiting = self._acks
        while waiting and self._acks is waiting and self._ack_flush is not None:
            if self._ack_taken is None:
                self._ack_taken = asyncio.Event()
            self._ack_taken.clear()
            await self._ack_taken.wait()
        held = self.capabilities.ack_delay
        if late and held and time.monotonic() - self._durable_at >= held:
            await self.acks_durable()

    async def _flush_acks(self) -> None:
        try:
            while self._acks and self.receiver is not None:
                batch, self._acks = self._acks, []
                if self._ack_taken is not None:
                    self._ack_taken.set()
                try:
                    await self.receiver.ack_many(batch)
                except MsgbusError as err:
                    log.warning("msgbus: ack of %d message(s) failed (they will be redelivered): %s", len(batch), err)
        finally:
            self._ack_flush = None
            if self._ack_taken is not None:
                self._ack_taken.set()  # nothing more will be taken: a waiter must not wait for that

    async def drain(self) -> None:
        """Wait until every ack handed to ``ack_soon`` has been sent."""
        while self._ack_flush is not None:
            await asyncio.shield(self._ack_flush)

    async def acks_durable(self) -> None:
        """Wait until every ack handed to ``ack_soon`` is durable on the backend (``Receiver.flush``)."""
        await self.drain()
        self._durable_at = time.monotonic()
        if self.receiver is not None and self.capabilities.ack_delay:
            try:
                await self.receiver.flush()
            except MsgbusError as err:
                log.warning("msgbus: could not make the acks on %s durable: %s", self.endpoint, err)

    async def release(self) -> None:
        """Hand every buffered message (fetched, never handed out) back to the backend, so other consumers get
        them now: all at once (``Receiver.release_many``), without counting a delivery where the backend can."""
        while self.buffer:
            batch = [msg for msg in self.buffer if msg._settle(nacked=True)]
            self.buffer.clear()
            if not batch:
                continue
            assert self.receiver is not None  # the buffer is filled through it
            try:
                await self.receiver.release_many([msg._delivery for msg in batch])
            except MsgbusError as err:
                log.debug("msgbus: release of %d buffered message(s) failed (locks expire): %s", len(batch), err)

    async def release_read_ahead(self) -> None:
        """After ``run()``: the receiver gives back its read-ahead too (a stopped consumer may stay open for long)."""
        if self.receiver is not None and not self.closed:
            try:
                await self.receiver.release()
            except MsgbusError as err:
                log.debug("msgbus: release of %s's read-ahead failed (its lock will expire): %s", self.endpoint, err)
