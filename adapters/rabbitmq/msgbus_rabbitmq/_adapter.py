"""The RabbitMQ adapter: endpoints, sends with publisher confirms, receivers with bounded credit.

Mapping (see docs/adapters/rabbitmq.md): queue ``q`` -> durable queue ``q``; topic ``t`` -> durable topic
exchange ``t``; subscription ``s`` of ``t`` -> durable queue ``t.s`` bound to ``t`` with ``#``; the
dead letters of queue ``x`` -> durable queue ``x.dlq`` (also the broker's dead-letter target for ``x``);
a delay of ``d`` ms towards ``x`` -> holding queue ``msgbus.delay.<d>ms.<x>`` whose messages expire
after ``d`` ms into ``x`` (TTL + dead-letter exchange), so nothing blocks while a message waits.
With ``ordering=per_key`` queue (or subscription queue) ``x`` is instead ``partitions`` single-active-consumer
quorum queues ``x.p0`` ... (a message goes to the one its key hashes to; a subscription's partition ``i`` is
bound with routing key ``t.p<i>``), sharing ``x.dlq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aio_pika.connection import make_url

from msgbus.adapter import Adapter, BusURL, Capabilities, Endpoint, OptionReader, Receiver, Record, deleted_queue
from msgbus.errors import ClosedError, ConfigError, ConnectionLost, MessageTooLarge, MsgbusError

from ._codec import encode
from ._config import RabbitMQOptions, read_options
from ._errors import convert, translated
from ._names import (
    MAX_NAME,
    QUEUE_NAME,
    delay_bucket_ms,
    holding_queue_name,
    partition_of,
    partition_queues,
    queue_name,
)
from ._receiver import RabbitMQReceiver

_T = TypeVar("_T")
log = logging.getLogger("msgbus")

MAX_DELAY = 7 * 24 * 3600.0  # holding-queue TTLs are 32-bit milliseconds; a week is a sane ceiling
_HOLDING_GRACE_MS = 300_000  # an idle holding queue is deleted this long after its messages are due
_HOLDING_REDECLARE = 60.0  # re-declare (resetting x-expires) when the last declare is older than this


def create(url: BusURL, options: OptionReader) -> RabbitMQAdapter:
    """Entry point for ``amqp://`` and ``amqps://`` URLs (registered under ``msgbus.adapters``)."""
    return RabbitMQAdapter(url, read_options(url, options))


CLASSIC_CREDIT = 128  # the natural credit on classic queues (see ``RabbitMQAdapter.credit``)


class RabbitMQAdapter(Adapter):
    """One robust aio-pika connection (a confirming publish channel, a topology channel) for sends and
    declares; each receiver consumes on a pika connection of its own.

    Task-safe: sends, declares and receivers may run concurrently on one event loop. Every connection
    reconnects by itself: aio-pika restores the declared topology, a receiver its consumer.
    """

    # basic.qos: the broker pushes up to this many unacked deliveries on the receiver's channel (run() raises it to
    # twice its workers). Kept small: a consumer that stops or closes puts back what it held, and a quorum queue
    # counts that as a delivery of each; at 128 the contract's "graceful shutdown" (consumers stopped in turn) took
    # messages never handled to the delivery limit. 16 (32 at concurrency 16) already keeps the channel busy:
    # docs/benchmarks.md, 2.9x aio-pika.
    credit = 16

    # AMQP has no batch publish: concurrent sends already share the channel, each publish in flight at once.
    coalesce_sends = False

    def __init__(self, url: BusURL, options: RabbitMQOptions) -> None:
        self.url = url
        self.options = options
        quorum = options.queue_type == "quorum"
        self.ordered = options.ordering == "per_key"
        if self.ordered:
            # One delivery per partition at defaults: more would let a consumer-killing message take what is held
            # behind it in its partition to the delivery limit (docs/adapters/rabbitmq.md, *Per-key ordering*).
            self.credit = options.partitions
        elif not quorum:
            # A classic queue does not count what a stopping consumer puts back, so the reason for 16 is gone;
            # at 16-32 the consumer waits for the broker's next push (docs/benchmarks.md: 8k vs 13k+ msgs/s).
            self.credit = CLASSIC_CREDIT
        self.capabilities = Capabilities(
            ordering="per_key" if self.ordered else "none",
            delayed_delivery=True,
            max_delay=MAX_DELAY,
            delayed_nack=True,
            native_dead_letter=False,  # the adapter re-publishes with the reason headers, then acks
            max_message_size=options.max_message_size,
            persistence="disk",
            cross_process=True,
            lock_extension=False,
            restartable=True,
            # Quorum queues count returns (x-delivery-count; x-acquired-count on 4.x); classic queues only flag
            # a redelivery, so a message that kills its consumer comes back as attempt 2 every time.
            counts_deliveries=quorum,
            native_delivery_limit=(options.delivery_limit or None) if quorum else None,
        )
        self._conn: AbstractRobustConnection | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._topology: AbstractRobustChannel | None = None
        self._declared: set[tuple[str, str, str | None]] = set()
        self._holding: dict[str, float] = {}  # holding queue -> loop time of its last declare
        self._receivers: set[RabbitMQReceiver] = set()
        self._lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"RabbitMQAdapter({self.url.redacted!r})"

    # -- connection -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (fails fast with ``ConnectionLost`` if the broker is unreachable now)."""
        if self._conn is not None:
            return
        s = self.options
        # aio_pika.connect_robust, with the connection in hand before it connects: an open cancelled while it
        # connects (a ping's timeout) must close it, or it reconnects forever in the background.
        url = make_url(
            host=s.host,
            port=s.port,
            login=s.username,
            password=s.password,
            virtualhost=s.vhost,
            ssl=s.tls is not None,
            heartbeat=s.heartbeat,
            reconnect_interval=s.reconnect_interval,
        )
        conn = aio_pika.RobustConnection(url, ssl_context=s.tls, client_properties={"connection_name": "msgbus"})
        with translated(f"connecting to {self.url.redacted}", [s.password]):
            try:
                await conn.connect(timeout=s.connect_timeout)
                self._publish_channel = await conn.channel(publisher_confirms=s.confirms, on_return_raises=s.confirms)
                self._topology = await conn.channel(publisher_confirms=False)
            except BaseException:
                await conn.close()
                raise
        conn.reconnect_callbacks.add(self._on_reconnect)
        self._conn = conn
        self._closed = False

    async def _on_reconnect(self, *_: object) -> None:
        self._holding.clear()  # the broker may have lost them; declare again on next use

    async def close(self) -> None:
        """Close the connection; unacked deliveries return to their queues. Idempotent."""
        self._closed = True
        for receiver in list(self._receivers):
            await receiver.close()
        conn, self._conn = self._conn, None
        self._publish_channel = self._topology = None
        self._declared.clear()
        self._holding.clear()
        if conn is not None:
            with translated("closing the connection", [self.options.password]):
                await conn.close()

    def _connection(self) -> AbstractRobustConnection:
        if self._conn is None:
            raise ClosedError("the RabbitMQ adapter is closed" if self._closed else "the RabbitMQ adapter is not open")
        return self._conn

    def _channels(self) -> tuple[AbstractRobustChannel, AbstractRobustChannel]:
        self._connection()
        assert self._publish_channel is not None and self._topology is not None
        return self._publish_channel, self._topology

    async def _retrying(self, doing: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``operation``; while the connection is down, wait for it and retry up to ``send_timeout``.

        Each attempt is bounded by what is left of ``send_timeout`` too: a connection that went silent (no
        error until heartbeats run out, 3 minutes at the default heartbeat) must not hold a send longer.
        A retry after a lost confirm may store the message twice (at-least-once, never at-most-once).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.send_timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):  # a timer, not a task per publish (the hot path)
                    return await operation()
            except TimeoutError:
                raise ConnectionLost(
                    f"{doing}: no answer from RabbitMQ within send_timeout ({self.options.send_timeout:g} s); "
                    "the message may or may not have been stored"
                ) from None
            except MsgbusError:
                raise
            except Exception as exc:
                err = convert(exc, doing, [self.options.password])
                remaining = deadline - loop.time()
                if not isinstance(err, ConnectionLost) or remaining <= 0 or self._conn is None:
                    raise err from exc
                pub, _ = self._channels()
                try:
                    async with asyncio.timeout(remaining):
                        await pub.ready()
                except TimeoutError:
                    raise err from exc
                await asyncio.sleep(0.05)  # let the restored channels settle before retrying

    # -- topology ---------------------------------------------------------------------------------

    def _queue_arguments(self, dlq: str | None, single_active: bool = False) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if single_active:  # one consumer at a time gets the queue's messages, in queue order
            args["x-single-active-consumer"] = True
        if self.options.queue_type == "quorum":
            args["x-queue-type"] = "quorum"
        if dlq is not None:
            args["x-dead-letter-exchange"] = ""  # the default exchange routes by queue name
            args["x-dead-letter-routing-key"] = dlq
            if self.options.queue_type == "quorum" and self.options.delivery_limit:
                # The broker's backstop: past it the queue dead-letters by itself, without msgbus's reason.
                args["x-delivery-limit"] = self.options.delivery_limit
        return args

    async def ping(self) -> None:
        """A passive declare of ``amq.direct`` (every vhost has it): one AMQP round trip on the topology channel."""
        _, topology = self._channels()
        with translated("ping", [self.options.password]):
            await topology.declare_exchange("amq.direct", aio_pika.ExchangeType.DIRECT, passive=True)

    async def declare(self, endpoint: Endpoint, *, create: bool = True) -> None:
        """Create (or with ``create=False`` only check) the queue/exchange and its dead-letter queue.

        Idempotent. Declaring a subscription creates the topic exchange, the subscription queue and its
        binding, so every message published after this returns reaches it.
        """
        key = (endpoint.kind, endpoint.name, endpoint.subscription)
        if key in self._declared:
            return
        _, topology = self._channels()
        async with self._lock:
            if key in self._declared:
                return
            if create:
                with translated(f"declaring {endpoint}", [self.options.password]):
                    await self._declare(topology, endpoint)
            else:
                await self._verify(endpoint)
            self._declared.add(key)

    async def delete(self, endpoint: Endpoint) -> None:
        """Delete the queue and its ``.dlq`` with their messages (RabbitMQ's queue.delete of a missing queue is
        fine) on the topology channel, which then forgets them: a reconnect does not declare them again."""
        main = queue_name(Endpoint("queue", deleted_queue(endpoint)))
        longest = f"{main}.p{self.options.partitions - 1}" if self.ordered else f"{main}.dlq"
        if len(longest.encode()) > MAX_NAME or not QUEUE_NAME.fullmatch(main):
            raise ConfigError(
                f"{endpoint}: not a RabbitMQ queue name (letters, digits, '_.:@#,/+ -', with .dlq 255 bytes)"
            )
        _, topology = self._channels()
        async with self._lock:
            self._declared.discard(("queue", endpoint.name, None))
            with translated(f"deleting {endpoint}", [self.options.password]):
                for name in (*self._queues_of(main), f"{main}.dlq"):
                    await topology.queue_delete(name)

    async def _declare(self, channel: AbstractRobustChannel, endpoint: Endpoint) -> None:
        exchange = None
        if endpoint.kind == "topic":
            exchange = await channel.declare_exchange(endpoint.name, aio_pika.ExchangeType.TOPIC, durable=True)
            if endpoint.subscription is None:
                return
        main = queue_name(Endpoint(endpoint.kind, endpoint.name, endpoint.subscription))
        dlq = f"{main}.dlq"
        await channel.declare_queue(dlq, durable=True, arguments=self._queue_arguments(None))
        arguments = self._queue_arguments(dlq)
        if "x-delivery-limit" in arguments and not await self._accepts(main, arguments):
            # Made before msgbus set a delivery limit: a queue's arguments cannot change, so keep it as it is
            # (what the robust channel declares must match, or every reconnect fails) and say how to add it.
            del arguments["x-delivery-limit"]
            log.warning(
                "msgbus: RabbitMQ queue %r exists without x-delivery-limit; it is used as it is (to add the "
                'broker\'s backstop, apply a policy with "delivery-limit": %d)',
                main,
                self.options.delivery_limit,
            )
        queue = await channel.declare_queue(main, durable=True, arguments=arguments)
        if self.ordered:
            if exchange is not None:  # unkeyed messages only (and what a publisher without the option sends)
                await queue.bind(exchange, exchange.name)
            await self._declare_partitions(channel, main, dlq, exchange)
        elif exchange is not None:
            await queue.bind(exchange, "#")

    async def _declare_partitions(
        self, channel: AbstractRobustChannel, main: str, dlq: str, exchange: aio_pika.abc.AbstractExchange | None
    ) -> None:
        """The single-active-consumer partition queues of ``main`` for keyed messages; a subscription's partition
        ``i`` bound with routing key ``<topic>.p<i>``."""
        arguments = self._queue_arguments(dlq, single_active=True)
        for i, name in enumerate(partition_queues(main, self.options.partitions)):
            queue = await channel.declare_queue(name, durable=True, arguments=arguments)
            if exchange is not None:
                await queue.bind(exchange, f"{exchange.name}.p{i}")

    def _queues_of(self, main: str) -> list[str]:
        """The queues that hold ``main``'s messages: itself, and under ``ordering=per_key`` its partitions."""
        return [main, *partition_queues(main, self.options.partitions)] if self.ordered else [main]

    async def _accepts(self, name: str, arguments: dict[str, Any]) -> bool:
        """Declare queue ``name`` with ``arguments`` on a throwaway channel: False if it exists with others
        (``PRECONDITION_FAILED`` closes that channel, not ours)."""
        probe = await self._connection().channel(publisher_confirms=False)
        try:
            await probe.declare_queue(name, durable=True, arguments=arguments, robust=False)
            return True
        except aio_pika.exceptions.ChannelPreconditionFailed:
            return False
        finally:
            try:
                await probe.close()
            except Exception:  # already closed by the broker
                pass

    async def _verify(self, endpoint: Endpoint) -> None:
        """Passive declares on a throwaway channel: a missing entity closes that channel, not ours."""
        async with self._probe(f"verifying {endpoint}") as probe:
            if endpoint.kind == "topic":
                await probe.declare_exchange(endpoint.name, passive=True, robust=False)
            if endpoint.kind == "queue" or endpoint.subscription is not None:
                main = queue_name(Endpoint(endpoint.kind, endpoint.name, endpoint.subscription))
                for name in (*self._queues_of(main), f"{main}.dlq"):
                    await probe.declare_queue(name, passive=True, robust=False)

    async def stats(self, endpoint: Endpoint) -> Mapping[str, float]:
        """From passive queue declares: the queue's ready messages and consumers, its ``.dlq``'s messages. AMQP
        reports no unacked count nor message ages (those are in the management plugin's HTTP API, not used)."""
        main = queue_name(Endpoint(endpoint.kind, endpoint.name, endpoint.subscription))
        async with self._probe(f"stats of {endpoint}") as probe:
            live = [await probe.declare_queue(name, passive=True, robust=False) for name in self._queues_of(main)]
            dead = await probe.declare_queue(f"{main}.dlq", passive=True, robust=False)
        found = [q.declaration_result for q in live]
        return {  # partitions: the sum of their depths, and the most consumers one has (each has every one)
            "depth": sum(r.message_count or 0 for r in found),
            "dead_letters": dead.declaration_result.message_count or 0,
            "consumers": max(r.consumer_count or 0 for r in found),
        }

    @contextlib.asynccontextmanager
    async def _probe(self, doing: str) -> AsyncIterator[AbstractRobustChannel]:
        """A throwaway channel for passive declares: a missing entity (404) closes it, not ours."""
        conn = self._connection()
        with translated(doing, [self.options.password]):
            probe = await conn.channel(publisher_confirms=False)
        try:
            with translated(doing, [self.options.password]):
                yield probe
        finally:
            try:
                await probe.close()
            except Exception:  # the probe may already be closed by the broker's 404
                pass

    async def _holding_queue(self, ms: int, target: str, kind: str, routing_key: str | None = None) -> str:
        """Declare (or refresh) the holding queue that releases into ``target`` after ``ms`` ms (into exchange
        ``target`` with ``routing_key``, when given: an ordered topic's partition)."""
        name = holding_queue_name(ms, routing_key or target, kind)
        now = asyncio.get_running_loop().time()
        if now - self._holding.get(name, -math.inf) < _HOLDING_REDECLARE:
            return name
        _, topology = self._channels()
        arguments: dict[str, Any] = {
            "x-message-ttl": ms,
            "x-expires": ms + _HOLDING_GRACE_MS,
            "x-dead-letter-exchange": "" if kind == "q" else target,
        }
        if kind == "q" or routing_key is not None:
            arguments["x-dead-letter-routing-key"] = routing_key or target
        # robust=False: holding queues are re-declared lazily, not restored forever on every reconnect.
        await topology.declare_queue(name, durable=True, arguments=arguments, robust=False)
        self._holding[name] = now
        return name

    # -- sending ----------------------------------------------------------------------------------

    async def send(self, endpoint: Endpoint, records: Sequence[Record], delay: float | None = None) -> None:
        """Publish persistent messages; return once the broker confirmed every one of them.

        Raises ``MessageTooLarge`` before sending anything, ``PublishError`` when the broker nacks or
        returns a message (queue missing), ``ConnectionLost`` when the broker stays unreachable (or
        silent) for ``send_timeout`` seconds. Messages already confirmed in a failed batch stay sent.
        """
        limit = self.options.max_message_size
        for r in records:
            if r.size() > limit:
                raise MessageTooLarge(r.size(), limit)
        if self.ordered and not endpoint.dead_letter and any(r.key is not None for r in records):
            unkeyed = [r for r in records if r.key is None]
            await self._send_partitioned(endpoint, [r for r in records if r.key is not None], delay)
            if not unkeyed:
                return
            records = unkeyed
        messages = [encode(r) for r in records]
        if endpoint.kind == "queue":
            target = queue_name(endpoint)
            exchange, routing_key, mandatory = "", target, True
        else:
            target = endpoint.name
            exchange, routing_key, mandatory = target, target, False  # no subscription yet is not an error
        if delay is not None and delay > 0:
            if delay > MAX_DELAY:
                raise ConfigError(f"delay {delay}s exceeds the RabbitMQ adapter's max_delay of {MAX_DELAY}s")
            ms = delay_bucket_ms(delay)
            with translated(f"declaring the delay queue for {endpoint}", [self.options.password]):
                holding = await self._holding_queue(ms, target, "q" if endpoint.kind == "queue" else "t")
            exchange, routing_key, mandatory = "", holding, True
        await self.publish_all(str(endpoint), exchange, routing_key, messages, mandatory)

    async def _send_partitioned(self, endpoint: Endpoint, records: Sequence[Record], delay: float | None) -> None:
        """``ordering=per_key``: each keyed record to the partition its key hashes to, a partition's in send order."""
        n = self.options.partitions
        groups: dict[int, list[aio_pika.Message]] = {}
        for r in records:
            groups.setdefault(partition_of(r, n), []).append(encode(r))
        delayed = delay is not None and delay > 0
        if delayed and delay is not None and delay > MAX_DELAY:
            raise ConfigError(f"delay {delay}s exceeds the RabbitMQ adapter's max_delay of {MAX_DELAY}s")
        sends = []
        for i, messages in groups.items():
            if endpoint.kind == "queue":
                exchange, routing_key, mandatory = "", f"{queue_name(endpoint)}.p{i}", True
                holding_args: tuple[str, str, str | None] = (routing_key, "q", None)
            else:
                exchange, routing_key, mandatory = endpoint.name, f"{endpoint.name}.p{i}", False
                holding_args = (endpoint.name, "t", routing_key)
            if delayed and delay is not None:
                with translated(f"declaring the delay queue for {endpoint}", [self.options.password]):
                    holding = await self._holding_queue(delay_bucket_ms(delay), *holding_args)
                exchange, routing_key, mandatory = "", holding, True
            sends.append(self.publish_all(str(endpoint), exchange, routing_key, messages, mandatory))
        for result in await asyncio.gather(*sends, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    async def publish_all(
        self, what: str, exchange: str, routing_key: str, messages: Sequence[aio_pika.Message], mandatory: bool
    ) -> None:
        """Pipeline the publishes on the confirming channel and wait for all confirms."""
        if not messages:
            return
        if len(messages) == 1:  # a single send: no gather, no task per message
            await self._publish(what, exchange, routing_key, messages[0], mandatory)
            return
        results = await asyncio.gather(
            *(self._publish(what, exchange, routing_key, m, mandatory) for m in messages), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _publish(
        self, what: str, exchange: str, routing_key: str, message: aio_pika.Message, mandatory: bool
    ) -> None:
        async def attempt() -> None:
            pub, _ = self._channels()
            channel = await pub.get_underlay_channel()
            await channel.basic_publish(
                message.body,
                exchange=exchange,
                routing_key=routing_key,
                properties=message.properties,
                mandatory=mandatory,
            )

        await self._retrying(f"sending to {what}", attempt)

    # -- receiving --------------------------------------------------------------------------------

    async def receiver(self, endpoint: Endpoint, prefetch: int) -> Receiver:
        """Consume from a queue, subscription or dead-letter queue with ``basic.qos(prefetch)``, on a
        connection of the receiver's own (``_receiver.py`` says why)."""
        self._connection()
        name = queue_name(endpoint)
        queues = [name] if endpoint.dead_letter else self._queues_of(name)
        ordered = self.ordered and not endpoint.dead_letter
        receiver = RabbitMQReceiver(self, endpoint, name, queues, prefetch, ordered=ordered)
        self._receivers.add(receiver)
        try:
            await receiver.connect()
            await receiver._resume()
        except BaseException:
            await receiver.close()
            raise
        receiver._pause_later()
        return receiver

    def forget(self, receiver: RabbitMQReceiver) -> None:
        """``receiver`` closed: the adapter no longer closes it."""
        self._receivers.discard(receiver)

    async def requeue_copy(self, record: Record, queue: str, prior_attempts: int, delay: float | None) -> None:
        """Re-publish ``record`` into ``queue`` (after ``delay``) carrying the attempts made so far."""
        message = encode(record, prior_attempts)
        routing_key = queue
        if delay is not None and delay > 0:
            ms = delay_bucket_ms(min(delay, MAX_DELAY))
            with translated(f"declaring the delay queue for {queue}", [self.options.password]):
                routing_key = await self._holding_queue(ms, queue, "q")
        await self.publish_all(f"queue {queue}", "", routing_key, [message], True)
