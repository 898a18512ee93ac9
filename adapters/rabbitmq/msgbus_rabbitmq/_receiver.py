"""Receivers: each consumes on an AMQP connection of its own, through pika's asyncio adapter.

Why pika here while sends use aio-pika: pika hands every delivery to a plain callback, with no task and no
message object per delivery, and the asyncio stack under aio-pika cannot keep up with it: consuming 20,000
messages with nothing on top, pika's adapter reached 21-26k msgs/s where aiormq (under aio-pika) reached
14-15k, same broker, same run (``docs/benchmarks.md``). A connection of its own also keeps a consumer
running while the broker blocks publishing connections (RabbitMQ's flow control acts per connection).

With ``ordering=per_key`` a receiver consumes the endpoint's queue (unkeyed messages, as without the option) and its
partition queues (keyed ones); each partition is a single-active-consumer queue, so the broker hands a partition
(and so a key) to one receiver at a time, in queue order. Inside the receiver
the kit's ``KeyHold`` hands a key's next delivery out only once the one before is settled. A nacked delivery is
returned alone and its key *parked* until it comes back: a quorum queue delivers returned messages before any
other, so it is the key's next delivery again, with its delivery count up by one; what was held behind it stays
here (giving it back would count a delivery on each of them too). A nack's delay is waited out here, holding it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import pika
import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection

from msgbus.adapter import Delivery, Endpoint, KeyHold, Receiver, Record, dead_letter_record, wait_set
from msgbus.errors import ClosedError, ConnectionLost, MsgbusError

from ._codec import decode, encode
from ._config import RabbitMQOptions
from ._errors import translated

if TYPE_CHECKING:
    import aio_pika


class Link(Protocol):
    """What a receiver uses of its adapter (a protocol: the adapter imports this module, not the reverse): the
    options, confirmed publishes (dead letters, requeued copies), and ``forget`` when it closes."""

    options: RabbitMQOptions

    async def requeue_copy(self, record: Record, queue: str, prior_attempts: int, delay: float | None) -> None: ...

    async def publish_all(
        self, what: str, exchange: str, routing_key: str, messages: Sequence[aio_pika.Message], mandatory: bool
    ) -> None: ...

    def forget(self, receiver: RabbitMQReceiver) -> None: ...


log = logging.getLogger("msgbus")

_IDLE_PAUSE = 0.25  # seconds without receive() before a receiver stops taking new messages
_HAND_OFF = 0.5  # seconds a receiver stays the active consumer of a partition before it lets the next one take it


class Incoming(NamedTuple):
    """One basic.deliver as it arrived: ``link`` numbers the channel it came on (tags are per channel)."""

    link: int
    delivery_tag: int
    redelivered: bool
    properties: Any  # pika.BasicProperties
    body: bytes
    partition: int = 0  # index of the queue it came from in the receiver's queues


class RabbitMQReceiver(Receiver):
    """Buffers what the broker pushes (at most ``prefetch`` unacked) and hands it out in batches.

    RabbitMQ pushes to every consumer with free credit, so a receiver nobody reads from would sit on
    messages other consumers are waiting for. The consumer is therefore cancelled after ``_IDLE_PAUSE``
    seconds without a ``receive()`` call (what it already holds stays held, until ``release()`` puts it back)
    and resumed by the next call.
    When the connection or channel is lost the receiver reconnects every ``reconnect_interval`` seconds
    until it is closed; deliveries from the lost channel are dropped (the broker has put them back).
    """

    def __init__(
        self, adapter: Link, endpoint: Endpoint, name: str, queues: Sequence[str], prefetch: int, *, ordered: bool
    ) -> None:
        self._adapter = adapter
        self._endpoint = endpoint
        self._name = name  # the endpoint's queue: where requeued copies go, ``.dlq`` appended for dead letters
        self._queues = list(queues)  # what it consumes: ``name``, then its partition queues if ordered
        self._prefetch = max(1, prefetch)
        self._conn: AsyncioConnection | None = None
        self._channel: Any = None  # pika Channel while open
        self._link = 0  # bumped whenever the channel is lost: its delivery tags mean nothing afterwards
        self._pending: set[asyncio.Future[Any]] = set()  # broker replies awaited on the current channel
        self._buffer: deque[Incoming] = deque()
        self._arrived = asyncio.Event()
        self._closed = False
        self._ready = False  # connected once: only then does a loss start reconnecting
        self._tags: dict[str, str] = {}  # queue -> consumer tag, while consuming it
        self._switch = asyncio.Lock()  # serialises connect/consume/cancel
        self._receiving = 0
        self._idle: asyncio.TimerHandle | None = None
        self._pausing: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        # Delivery tags of the current channel not yet settled, in delivery order, and those of them settled
        # out of order: ack_many acks the settled prefix with one ``multiple=True`` frame.
        self._open_tags: deque[int] = deque()
        self._done_tags: set[int] = set()
        # ordering=per_key: the per-key hold, the keys parked until their nacked head comes back (its message id,
        # what was held behind it), and the nacks waiting out their delay.
        self._hold: KeyHold[RabbitMQDelivery] | None = KeyHold() if ordered else None
        self._parked: dict[str, tuple[str, list[RabbitMQDelivery]]] = {}
        self._returning: dict[int, tuple[asyncio.TimerHandle, Incoming, list[RabbitMQDelivery]]] = {}
        self._kept: deque[RabbitMQDelivery] = deque()  # given back by a stopping run() on a partition: see release_many
        # Per partition: deliveries unsettled here, and since when it is consumed (see ``_hand_off``).
        self._unsettled = [0] * len(self._queues)
        self._since = [0.0] * len(self._queues)
        self._qos = 0  # the basic.qos of the current channel: it applies to the consumers created after it
        self._consuming_again: asyncio.Future[None] | None = None

    # -- the connection -----------------------------------------------------------------------------

    def _parameters(self) -> pika.ConnectionParameters:
        s = self._adapter.options
        return pika.ConnectionParameters(
            host=s.host,
            port=s.port,
            virtual_host=s.vhost,
            credentials=pika.PlainCredentials(s.username, s.password),
            ssl_options=pika.SSLOptions(s.tls, s.host) if s.tls is not None else None,
            heartbeat=s.heartbeat,
            connection_attempts=1,
            socket_timeout=s.connect_timeout,
            stack_timeout=s.connect_timeout,
            client_properties={"connection_name": "msgbus consumer"},
        )

    async def connect(self) -> None:
        """Open the connection and channel, set the credit and check that the queue exists (fails fast)."""
        async with self._switch:
            with translated(f"opening a receiver on {self._endpoint}", [self._adapter.options.password]):
                await self._connect()
            self._ready = True

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        if self._conn is None or not self._conn.is_open:
            opened: asyncio.Future[None] = loop.create_future()

            def on_open(_conn: Any) -> None:
                if not opened.done():
                    opened.set_result(None)

            def on_error(_conn: Any, error: BaseException | str) -> None:
                if not opened.done():
                    opened.set_exception(error if isinstance(error, BaseException) else ConnectionError(error))

            conn = AsyncioConnection(
                self._parameters(),
                on_open_callback=on_open,
                on_open_error_callback=on_error,
                on_close_callback=self._on_connection_closed,
                custom_ioloop=loop,
            )
            try:
                async with asyncio.timeout(self._adapter.options.connect_timeout):
                    await opened
            except BaseException:
                if not (conn.is_closed or conn.is_closing):
                    conn.close()
                raise
            self._conn = conn
        channel_open: asyncio.Future[Any] = loop.create_future()
        self._pending.add(channel_open)  # fails with the reason if the connection drops meanwhile
        try:
            self._conn.channel(on_open_callback=_resolver(channel_open))
            async with asyncio.timeout(self._adapter.options.connect_timeout):
                channel = await channel_open
        finally:
            self._pending.discard(channel_open)
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_cancelled)
        self._channel = channel
        self._qos = 0
        for queue in self._queues:
            await self._call(channel.queue_declare, queue=queue, passive=True)

    def _credit(self, partition: int) -> int:
        """``basic.qos`` of a consumer (RabbitMQ's reading of ``global_qos=False``): ``prefetch`` for the endpoint's
        queue; for each partition ``prefetch`` split between them, rounded down. So a returned message always finds
        room in its own queue's credit (a channel-wide limit could be taken by other partitions' messages), and what
        a dying consumer held of a partition, counted a delivery each time, is only more than the message that killed
        it when ``prefetch`` exceeds ``partitions`` (docs/adapters/rabbitmq.md, *Per-key ordering*)."""
        if partition == 0:
            return self._prefetch
        return max(1, self._prefetch // (len(self._queues) - 1))

    async def _call(self, method: Callable[..., Any], **kwargs: Any) -> Any:
        """Send a synchronous AMQP method on the current channel and wait for the broker's reply.

        The wait ends with the channel's close reason if the channel closes first.
        """
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.add(reply)
        try:
            method(**kwargs, callback=_resolver(reply))
            return await reply
        finally:
            self._pending.discard(reply)

    def _on_connection_closed(self, conn: Any, reason: BaseException) -> None:
        if conn is self._conn:
            self._conn = None
            self._lost(reason)

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if channel is self._channel:
            self._lost(reason)
            if self._conn is not None and self._conn.is_open:
                self._conn.close()  # start again on a fresh connection, one path for every loss

    def _lost(self, reason: BaseException) -> None:
        """The channel is gone: fail what waits on it, forget its tags, reconnect unless closing."""
        self._channel = None
        self._tags.clear()
        self._link += 1
        self._open_tags.clear()
        self._done_tags.clear()
        self._unsettled = [0] * len(self._queues)
        self._forget_order()
        for reply in self._pending:
            if not reply.done():
                reply.set_exception(reason)
        self._arrived.set()  # wake a waiting receive() so it drops the stale buffer
        if self._ready and not self._closed and self._reconnecting is None:
            log.warning("msgbus: RabbitMQ receiver on %s lost its channel (%s); reconnecting", self._endpoint, reason)
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        try:
            while not self._closed:
                await asyncio.sleep(self._adapter.options.reconnect_interval)
                try:
                    async with self._switch:
                        if self._closed:
                            return
                        await self._connect()
                        if self._receiving:
                            await self._consume()
                    log.info("msgbus: RabbitMQ receiver on %s reconnected", self._endpoint)
                    return
                except Exception as exc:  # broker still down, or the queue is gone: keep trying until closed
                    log.info("msgbus: RabbitMQ receiver on %s: reconnect failed (%s)", self._endpoint, exc)
        finally:
            self._reconnecting = None

    def _on_cancelled(self, frame: Any) -> None:
        # The broker cancelled a consumer (queue deleted); the next receive() tries again.
        tag = frame.method.consumer_tag
        self._tags = {q: t for q, t in self._tags.items() if t != tag}

    def _forget_order(self) -> None:
        """The broker has taken back every unsettled delivery (channel lost, closed): start the hold afresh."""
        if self._hold is not None:
            self._hold = KeyHold()
            self._parked.clear()
            for handle, _, _ in self._returning.values():
                handle.cancel()
            self._returning.clear()
            self._kept.clear()

    # -- consuming ------------------------------------------------------------------------------------

    def _on_message(self, partition: int, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        if channel is not self._channel:
            return  # a late frame of a channel already given up; the broker puts the message back
        tag: int = method.delivery_tag
        self._open_tags.append(tag)
        self._unsettled[partition] += 1
        self._buffer.append(Incoming(self._link, tag, method.redelivered, properties, body, partition))
        self._arrived.set()

    async def _consume(self) -> None:
        for partition, queue in enumerate(self._queues):
            if queue not in self._tags and self._channel is not None and not self._closed:
                credit = self._credit(partition)
                if credit != self._qos:
                    await self._call(self._channel.basic_qos, prefetch_count=credit)
                    self._qos = credit
                # The partition is bound to the callback: deliveries may come before this call returns.
                callback = functools.partial(self._on_message, partition)
                ok = await self._call(self._channel.basic_consume, queue=queue, on_message_callback=callback)
                self._tags[queue] = ok.method.consumer_tag
                self._since[partition] = asyncio.get_running_loop().time()

    async def _cancel(self, idle_only: bool = False, main_only: bool = False) -> None:
        """basic.cancel every consumer (a lost channel has dropped them anyway); with ``idle_only`` not those of
        partitions with deliveries unsettled here: a single-active-consumer queue whose consumer cancels goes to the
        next one at once, which would get their keys' next messages. ``main_only``: the endpoint's own queue's."""
        for queue, tag in list(self._tags.items()):
            if self._channel is None or (idle_only and self._receiving):
                return  # a receive() came meanwhile: it wants them (one cancel is a round trip, 17 take a while)
            partition = self._queues.index(queue)
            if partition > 0 and (main_only or (idle_only and self._unsettled[partition])):
                continue
            del self._tags[queue]
            try:
                await self._call(self._channel.basic_cancel, consumer_tag=tag)
            except Exception:  # channel gone: the broker has dropped the consumer anyway
                pass

    async def _resume(self) -> None:
        async with self._switch:
            await self._consume()

    async def _pause(self) -> None:
        async with self._switch:
            if not self._receiving and not self._closed:
                await self._cancel(idle_only=True)
                if self._tags:
                    self._pause_later()  # the partitions still held: once they are settled

    def _pause_later(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(_IDLE_PAUSE, self._start_pause)

    def _start_pause(self) -> None:
        self._idle = None
        if not self._receiving and not self._closed:
            self._pausing = asyncio.ensure_future(self._pause())

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` s for a delivery, then take what else is buffered, up to ``max_messages``.

        While the connection is down this returns nothing after ``timeout``; consuming resumes once the
        receiver has reconnected.
        """
        if self._closed:
            raise ClosedError(f"receiver on {self._endpoint} is closed")
        self._receiving += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            if len(self._tags) < len(self._queues) and self._channel is not None:
                with translated(f"receiving from {self._endpoint}"):
                    await self._resume()
            return await self._collect(max_messages, timeout)
        finally:
            self._receiving -= 1
            if not self._receiving and not self._closed:
                self._pause_later()

    async def _collect(self, max_messages: int, timeout: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        out: list[Delivery] = []
        buffer, hold = self._buffer, self._hold
        while not out:
            if hold is not None:
                while self._kept and len(out) < max_messages:  # given back by release_many, still ours: first
                    out.append(self._kept.popleft())
                out.extend(hold.ready(max_messages - len(out)))  # their turn came: before anything buffered
                if out:
                    return out
            if not buffer:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return out
                self._arrived.clear()
                if not await wait_set(self._arrived, remaining):
                    return out
            if self._closed:
                raise ClosedError(f"receiver on {self._endpoint} is closed")
            while buffer and len(out) < max_messages:
                incoming = buffer.popleft()
                if incoming.link == self._link:
                    if hold is None:
                        out.append(self._delivery(incoming))
                    else:
                        out.extend(self._admit(hold, self._delivery(incoming)))
        return out

    def _admit(self, hold: KeyHold[RabbitMQDelivery], delivery: RabbitMQDelivery) -> list[RabbitMQDelivery]:
        """Through the hold, unless its key is parked: then the nacked head, back, goes first; others wait."""
        key = delivery.record.key
        parked = self._parked.get(key) if key is not None else None
        if parked is None:
            return hold.admit((delivery,))
        head, behind = parked
        if delivery.record.id != head:
            behind.append(delivery)
            return []
        del self._parked[key]  # type: ignore[arg-type]
        return hold.admit((delivery, *behind))

    def _delivery(self, incoming: Incoming) -> RabbitMQDelivery:
        p = incoming.properties
        try:
            decoded = decode(
                incoming.body,
                p.headers,
                message_id=p.message_id,
                correlation_id=p.correlation_id,
                content_type=p.content_type,
                timestamp=p.timestamp,
                redelivered=incoming.redelivered,
            )
        except Exception as exc:  # a foreign producer's unreadable properties: the core dead-letters it
            record = Record(body=bytes(incoming.body), id=str(p.message_id or ""))
            return RabbitMQDelivery(record, 1, incoming, self, f"unreadable AMQP properties: {exc!r:.200}")
        return RabbitMQDelivery(decoded.record, decoded.attempt, incoming, self)

    # -- settling -------------------------------------------------------------------------------------

    def _current(self, incoming: Incoming) -> bool:
        """Whether ``incoming`` came on the channel that is open now (its tag still means something)."""
        return incoming.link == self._link and self._channel is not None and self._channel.is_open

    def _settle(self, incoming: Incoming, doing: str, requeue: bool | None = None) -> None:
        """basic.ack (``requeue`` None) or basic.nack of one delivery; note it as settled."""
        if not self._current(incoming):
            raise ConnectionLost(
                f"RabbitMQ: {doing} on {self._endpoint} failed: the channel closed first; the broker redelivers it"
            )
        with translated(f"{doing} on {self._endpoint}"):
            if requeue is None:
                self._hand_off({incoming.partition: 1})
                self._channel.basic_ack(incoming.delivery_tag)
            else:
                self._channel.basic_nack(incoming.delivery_tag, requeue=requeue)
        self._done_tags.add(incoming.delivery_tag)
        self._unsettled[incoming.partition] -= 1
        self._advance()

    def _hand_off(self, acking: Mapping[int, int]) -> None:
        """Before acks of partitions' last unsettled deliveries: let the next waiting consumer have the partitions
        this receiver has been active on for ``_HAND_OFF`` seconds, and queue up again behind it.

        A single-active-consumer queue keeps its first consumer active for as long as it stays, so consumers started
        together would leave all partitions to one of them. The basic.cancel goes out before the ack on the same
        channel, so the broker hands the partition over with nothing of it left here: the next consumer gets only
        messages after the ones this one handled. Not while a key is parked or a synchronous call is pending
        (pika would queue the cancel behind it, after the ack).
        """
        if self._hold is None or self._parked or self._returning or self._pending or self._channel is None:
            return
        now = asyncio.get_running_loop().time()
        handed = False
        for partition, n in acking.items():
            queue = self._queues[partition]
            tag = self._tags.get(queue)
            # Only with its whole credit in these acks: then nothing more of it can be on the way here.
            if partition == 0 or tag is None or not self._unsettled[partition] == n == self._credit(partition):
                continue
            if now - self._since[partition] < _HAND_OFF:
                continue
            del self._tags[queue]
            self._channel.basic_cancel(consumer_tag=tag)  # no callback: nowait, sent now
            handed = True
        if handed and not self._closed and self._consuming_again is None:
            self._consuming_again = asyncio.ensure_future(self._consume_again())

    async def _consume_again(self) -> None:
        """After a hand-off: consume the partitions again, behind the consumers now active on them."""
        try:
            await self._resume()
        except Exception as exc:  # the channel is gone: the reconnect consumes them again
            log.debug("msgbus: RabbitMQ receiver on %s: consuming again failed (%s)", self._endpoint, exc)
        finally:
            self._consuming_again = None

    def _settled(self, delivery: RabbitMQDelivery) -> None:
        """``delivery`` is acked or dead-lettered: its key's next delivery may go out."""
        if self._hold is not None:
            self._hold.settled(delivery)
            self._arrived.set()  # a receive() waiting may return it

    def _return_later(self, delivery: RabbitMQDelivery, delay: float | None) -> None:
        """Nack of an ordered delivery: park its key with what was held behind it, requeue it after ``delay``."""
        assert self._hold is not None
        behind = self._hold.released(delivery)
        key = delivery.record.key
        limit = self._adapter.options.delivery_limit
        if key is not None and (not limit or delivery.attempt <= limit):
            self._parked[key] = (delivery.record.id, behind)
            behind = []
        # else past the broker's delivery limit it will not come back (dead-lettered): give back the rest after it
        incoming = delivery.raw
        if delay is None or delay <= 0:
            self._return(incoming, behind)
            return
        handle = asyncio.get_running_loop().call_later(delay, self._return, incoming, behind)
        self._returning[id(incoming)] = (handle, incoming, behind)

    def _return(self, incoming: Incoming, behind: Sequence[RabbitMQDelivery] = ()) -> None:
        """basic.nack with requeue of ``incoming``, then of ``behind``: in that order at the head of their queue."""
        self._returning.pop(id(incoming), None)
        for raw in (incoming, *(d.raw for d in behind)):
            if self._current(raw):
                try:
                    self._settle(raw, "nacking", requeue=True)
                except MsgbusError as err:  # the channel closed meanwhile: the broker has it back anyway
                    log.debug("msgbus: RabbitMQ requeue on %s failed: %s", self._endpoint, err)

    def _advance(self) -> None:
        """Drop the settled prefix of the open tags."""
        while self._open_tags and self._open_tags[0] in self._done_tags:
            self._done_tags.discard(self._open_tags.popleft())

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack with one ``basic.ack(multiple=True)`` up to the highest tag below which everything is settled.

        ``multiple`` acks every unsettled delivery up to that tag, so it covers only tags that are in this
        batch or already settled on the broker; the rest of the batch is acked one by one.
        """
        batch: dict[int, RabbitMQDelivery] = {}
        singles: list[Delivery] = []
        for d in deliveries:
            if isinstance(d, RabbitMQDelivery) and d._receiver is self and self._current(d.raw):
                batch[d.raw.delivery_tag] = d
            else:
                singles.append(d)
        upto = 0
        open_tags, done = self._open_tags, self._done_tags
        while open_tags and (open_tags[0] in batch or open_tags[0] in done):
            tag = open_tags.popleft()
            done.discard(tag)
            if tag in batch:
                upto = tag
        if upto:
            acked = [d for tag, d in batch.items() if tag <= upto]
            with translated(f"acking on {self._endpoint}"):
                if self._hold is not None:
                    self._hand_off(Counter(d.raw.partition for d in acked))
                self._channel.basic_ack(upto, multiple=True)
            for d in acked:
                self._unsettled[d.raw.partition] -= 1
                self._settled(d)
        for tag, d in batch.items():
            if tag > upto:
                singles.append(d)
        for d in singles:
            await d.ack()

    async def release(self) -> None:
        """Cancel the consumer and put back (nack, requeue) what the broker pushed that ``receive`` has not
        returned: a stopped ``run()`` must not sit on messages other consumers wait for until it is closed.
        The next ``receive`` consumes again."""
        async with self._switch:
            if not self._closed:
                await self._cancel()
            if self._hold is not None:  # in order within each key: nacked heads, what waits for them, what is held
                while self._kept:
                    kept = self._kept.popleft()
                    self._return(kept.raw, self._hold.released(kept))
                for handle, incoming, behind in list(self._returning.values()):
                    handle.cancel()
                    self._return(incoming, behind)
                for _, behind in self._parked.values():
                    self._return_all(behind)
                self._parked.clear()
                self._return_all(self._hold.drain())
            while self._buffer:  # after cancel-ok nothing more arrives for the cancelled tag
                incoming = self._buffer.popleft()
                if self._current(incoming):
                    self._settle(incoming, "releasing", requeue=True)

    async def release_many(self, deliveries: Sequence[Delivery]) -> None:
        """A stopping consumer's buffer, nacked (the kit's default) once the broker stops pushing to this receiver
        (basic.cancel, as ``release`` does; the next ``receive`` consumes again): otherwise what goes back is pushed
        straight back here and returned again by ``release``, a second delivery counted for nothing.

        Ordered receivers cancel only the endpoint's own queue (keyless messages). A partition's consumer stays,
        since cancelling it would hand the partition over while handlers here still run its messages; its
        deliveries stay here unsettled instead (``receive`` hands them out again first, ``release`` gives them
        back after its cancel, ``close`` with the channel): nobody else could have them while this receiver is
        the partition's single active consumer, and a nack would have the broker push them straight back."""
        if self._hold is not None:
            rest: list[Delivery] = []
            for d in deliveries:
                if isinstance(d, RabbitMQDelivery) and self._keeps(d):
                    self._kept.append(d)
                else:
                    rest.append(d)
            if not rest:
                return
            deliveries = rest
        async with self._switch:
            if not self._closed:
                await self._cancel(main_only=self._hold is not None)
        await super().release_many(deliveries)

    def _keeps(self, delivery: RabbitMQDelivery) -> bool:
        """Whether ``release_many`` keeps ``delivery``: a partition's, of this receiver's open channel."""
        return delivery._receiver is self and delivery.raw.partition > 0 and self._current(delivery.raw)

    def _return_all(self, deliveries: Sequence[RabbitMQDelivery]) -> None:
        for d in deliveries:
            self._return(d.raw)

    async def close(self) -> None:
        """Close the connection; acks nothing, so unsettled and buffered messages go back to the queue."""
        if self._closed:
            return
        self._closed = True
        if self._idle is not None:
            self._idle.cancel()
        if self._pausing is not None:
            await asyncio.gather(self._pausing, return_exceptions=True)
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            await asyncio.gather(self._reconnecting, return_exceptions=True)
        self._buffer.clear()
        self._forget_order()  # closing the channel gives back every unsettled delivery, in delivery order
        self._arrived.set()
        conn, self._conn = self._conn, None
        self._channel = None
        self._link += 1
        if conn is not None and not (conn.is_closed or conn.is_closing):
            closed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            conn.add_on_close_callback(_resolver(closed))
            try:
                conn.close()
                async with asyncio.timeout(self._adapter.options.connect_timeout):
                    await closed
            except (TimeoutError, pika.exceptions.AMQPError):
                pass  # the broker releases the connection's deliveries either way
        self._adapter.forget(self)


def _resolver(future: asyncio.Future[Any]) -> Callable[..., None]:
    """A pika callback that completes ``future`` with its first argument (once; later calls are ignored)."""

    def resolve(value: Any = None, *_: Any) -> None:
        if not future.done():
            future.set_result(value)

    return resolve


class RabbitMQDelivery(Delivery):
    """One AMQP delivery. Settling on a lost channel is a no-op for nack (the broker already put it back)."""

    __slots__ = ("_receiver",)

    raw: Incoming

    def __init__(
        self, record: Record, attempt: int, raw: Incoming, receiver: RabbitMQReceiver, problem: str | None = None
    ) -> None:
        super().__init__(record, attempt, raw, problem)
        self._receiver = receiver

    async def ack(self) -> None:
        """basic.ack. Raises ``ConnectionLost`` if the channel closed first (the message will come back)."""
        self._receiver._settle(self.raw, "acking")
        self._receiver._settled(self)

    async def nack(self, delay: float | None = None) -> None:
        """Release for another attempt (after ``delay`` s via a holding queue, without blocking anyone)."""
        receiver = self._receiver
        if not receiver._current(self.raw):
            return
        adapter = receiver._adapter
        if receiver._hold is not None and self.raw.partition:  # a partition: back to its head, its key parked
            receiver._return_later(self, delay)
            return
        if (delay is None or delay <= 0) and adapter.options.queue_type == "quorum":
            # Quorum queues count this return in x-delivery-count, so a plain requeue keeps the count.
            receiver._settle(self.raw, "nacking", requeue=True)
            return
        # Classic queues only flag redeliveries, so carry the count on a confirmed copy, then ack.
        await adapter.requeue_copy(self.record, receiver._name, self.attempt, delay)
        await self.ack()

    async def dead_letter(self, reason: str) -> None:
        """Publish ``dead_letter_record`` to the dead-letter queue with a confirm, then ack here.

        At-least-once: a crash between the two leaves the message in both places, never in neither.
        """
        receiver = self._receiver
        source = receiver._endpoint
        target = receiver._name if source.dead_letter else f"{receiver._name}.dlq"
        record = dead_letter_record(self.record, reason, self.attempt, source)
        await receiver._adapter.publish_all(f"dead letters of {source}", "", target, [encode(record)], True)
        await self.ack()
