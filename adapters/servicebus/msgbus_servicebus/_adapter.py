"""The Service Bus adapter on the azure-servicebus ``aio`` SDK: queue = queue, topic = topic,
subscription = subscription, peek-lock receivers, native dead-lettering and scheduled messages.

See ``docs/adapters/servicebus.md`` for the mapping and what differs from other backends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage, ServiceBusReceiveMode, ServiceBusSubQueue
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver, ServiceBusSender

from msgbus.adapter import Adapter, BusURL, Capabilities, Delivery, Endpoint, OptionReader, Receiver, Record
from msgbus.errors import ClosedError, ConnectionLost, InvalidMessage, MessageTooLarge, MsgbusError

from . import _codec
from ._config import ServiceBusOptions, check_entity, read_options
from ._errors import translated
from ._topology import Topology

__all__ = ["ServiceBusAdapter", "ServiceBusDelivery", "ServiceBusReceiverAdapter", "create"]

log = logging.getLogger("msgbus.servicebus")

_RECEIVE_SLICE = 0.1  # seconds one receive call may hold the SDK receiver while settlements wait


def create(url: BusURL, options: OptionReader) -> ServiceBusAdapter:
    """Entry point for ``servicebus://`` URLs; does no I/O."""
    return ServiceBusAdapter(url, read_options(url, options))


def _entity(endpoint: Endpoint) -> str:
    """The entity a sender addresses (queue or topic), with Service Bus' name rules checked."""
    return check_entity(endpoint.kind, endpoint.name, 260)


class ServiceBusAdapter(Adapter):
    """One ``ServiceBusClient``; a cached sender per queue/topic; a receiver per consumer."""

    def __init__(self, url: BusURL, options: ServiceBusOptions) -> None:
        self.url = url
        self.options = options
        self.capabilities = Capabilities(
            ordering="none",  # sessions would give per-key order; not declared until the contract proves it
            delayed_delivery=True,  # scheduled messages
            max_delay=None,
            delayed_nack=True,  # a scheduled copy, then complete the original
            native_dead_letter=True,  # the $DeadLetterQueue sub-queue
            max_message_size=options.max_message_size,
            persistence="disk",
            cross_process=True,
            lock_extension=True,  # renew-lock
            restartable=True,
            lock_duration=options.lock_duration,
            counts_deliveries=True,  # DeliveryCount: abandon and lock expiry, so a dead consumer's locks too
            # MaxDeliveryCount: set on the entities msgbus creates (management=admin); elsewhere the entity's own
            native_delivery_limit=options.max_delivery_count,
        )
        self._secrets = [options.key]
        self._client: ServiceBusClient | None = None
        self._senders: dict[str, ServiceBusSender] = {}
        self._send_locks: dict[str, asyncio.Lock] = {}  # an SDK sender is not safe for concurrent calls
        self._sender_lock = asyncio.Lock()
        self._receivers: set[ServiceBusReceiverAdapter] = set()
        self._topology = Topology(options)
        self._closed = False

    def __repr__(self) -> str:
        return f"ServiceBusAdapter({self.url.redacted!r})"

    @property
    def client(self) -> ServiceBusClient:
        if self._closed:
            raise ClosedError(f"{self!r} is closed")
        if self._client is None:
            raise ClosedError(f"{self!r} is not open")
        return self._client

    async def open(self) -> None:
        """Create the client. Service Bus connects per sender/receiver, so failures show on first use."""
        if self._closed:
            raise ClosedError(f"{self!r} is closed")
        if self._client is None:
            with translated("connect", secrets=self._secrets):
                self._client = ServiceBusClient.from_connection_string(
                    self.options.connection_string, retry_total=self.options.retry_total
                )

    async def close(self) -> None:
        """Close every receiver, sender and the client; idempotent."""
        if self._closed:
            return
        self._closed = True
        for receiver in list(self._receivers):
            await receiver.close()
        senders, self._senders = list(self._senders.values()), {}
        for sender in senders:
            await _quietly(sender.close())
        await self._topology.close()
        if self._client is not None:
            await _quietly(self._client.close())

    async def ping(self) -> None:
        """The namespace's properties (``management=admin``), else a sender link attached and closed again."""
        await self._topology.ping(self.client)

    async def declare(self, endpoint: Endpoint, *, create: bool = True) -> None:
        """Create (``management=admin``) or check the entity; see ``_topology``."""
        _entity(endpoint)
        if endpoint.subscription is not None:
            check_entity("subscription", endpoint.subscription, 50)
        await self._topology.declare(endpoint, create=create, client=self.client)

    async def _sender(self, name: str) -> ServiceBusSender:
        sender = self._senders.get(name)
        if sender is None:
            async with self._sender_lock:
                sender = self._senders.get(name)
                if sender is None:
                    sender = self.client.get_queue_sender(name)  # a topic sender is the same link
                    with translated(f"open sender for {name!r}", secrets=self._secrets):
                        await sender.__aenter__()
                    self._senders[name] = sender
        return sender

    async def send(self, endpoint: Endpoint, records: Sequence[Record], delay: float | None = None) -> None:
        """Send ``records`` (in as few batches as fit); returns once the service accepted every one.

        With ``delay`` they are scheduled messages (``schedule_messages``) due ``delay`` seconds from now.
        """
        if not records:
            return
        limit = self.options.max_message_size
        for record in records:
            if record.size() > limit:
                raise MessageTooLarge(record.size(), limit)
        await self.send_messages(_entity(endpoint), [_codec.encode(r) for r in records], delay)

    async def send_messages(self, name: str, messages: list[ServiceBusMessage], delay: float | None) -> None:
        sender = await self._sender(name)
        async with self._send_locks.setdefault(name, asyncio.Lock()):
            await self._send_locked(sender, name, messages, delay)

    async def _send_locked(
        self, sender: ServiceBusSender, name: str, messages: list[ServiceBusMessage], delay: float | None
    ) -> None:
        with translated(f"send to {name!r}", publish=True, secrets=self._secrets):
            if delay:
                due = datetime.now(UTC) + timedelta(seconds=delay)
                await sender.schedule_messages(messages, due)
                return
            if len(messages) == 1:
                await sender.send_messages(messages[0])
                return
            # Pack every message before sending any, so a message that fits no batch stores nothing.
            batches = [await sender.create_message_batch()]
            for message in messages:
                try:
                    batches[-1].add_message(message)
                except ValueError:  # full (MessageSizeExceededError is a ValueError too): start another
                    if len(batches[-1]) == 0:
                        raise InvalidMessage(
                            f"servicebus send to {name!r} failed: a message does not fit in a batch of "
                            f"{batches[-1].max_size_in_bytes} bytes once encoded (lower the max_message_size "
                            "option to the entity's limit); nothing was sent"
                        ) from None
                    batches.append(await sender.create_message_batch())
                    batches[-1].add_message(message)
            for batch in batches:
                await sender.send_messages(batch)

    async def receiver(self, endpoint: Endpoint, prefetch: int) -> Receiver:
        """A peek-lock receiver on the queue, subscription, or their ``$DeadLetterQueue``; attached on return."""
        _entity(endpoint)
        if endpoint.kind == "topic":
            if endpoint.subscription is None:
                raise ValueError("receiving from a topic needs a subscription")
            check_entity("subscription", endpoint.subscription, 50)
        receiver = ServiceBusReceiverAdapter(self, endpoint)
        await receiver.open()
        self._receivers.add(receiver)
        return receiver

    def sdk_receiver(self, endpoint: Endpoint) -> ServiceBusReceiver:
        """A new (not yet attached) SDK receiver for ``endpoint``."""
        common: dict[str, Any] = {
            "receive_mode": ServiceBusReceiveMode.PEEK_LOCK,
            "prefetch_count": 0,  # credit per receive call: nothing is locked that msgbus has not asked for
            "sub_queue": ServiceBusSubQueue.DEAD_LETTER if endpoint.dead_letter else None,
        }
        if endpoint.subscription is not None:
            return self.client.get_subscription_receiver(endpoint.name, endpoint.subscription, **common)
        return self.client.get_queue_receiver(endpoint.name, **common)


class ServiceBusReceiverAdapter(Receiver):
    """Pulls peek-locked messages with ``receive_messages``; settles through the same SDK receiver."""

    def __init__(self, adapter: ServiceBusAdapter, endpoint: Endpoint) -> None:
        self._adapter = adapter
        self.endpoint = endpoint
        self.sdk = adapter.sdk_receiver(endpoint)
        self._secrets = adapter._secrets
        self._closed = False
        self._held: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Task[None]] = set()  # old SDK receivers being closed
        self._stale = False  # the connection was lost: replace the SDK receiver before the next receive
        # The SDK's aio receiver is not coroutine-safe: receive, settle and renew take turns.
        self.lock = asyncio.Lock()

    def hold(self, delivery: ServiceBusDelivery, delay: float) -> None:
        """Abandon ``delivery`` after ``delay`` seconds, renewing its lock meanwhile (delayed nack)."""
        task = asyncio.create_task(delivery._abandon_later(delay))
        self._held.add(task)
        task.add_done_callback(self._held.discard)

    async def open(self) -> None:
        with translated(f"attach receiver to {self.endpoint}", secrets=self._secrets):
            await self.sdk.__aenter__()

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Receive in short slices, so settlements (which share the SDK receiver's lock) are not held back."""
        if self._closed:
            raise ClosedError(f"receiver for {self.endpoint} is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            wait = max(0.05, min(_RECEIVE_SLICE, deadline - loop.time()))
            async with self.lock:
                if self._stale:
                    await self._replace()
                try:
                    with translated(f"receive from {self.endpoint}", secrets=self._secrets):
                        batch = await self.sdk.receive_messages(max_message_count=max_messages, max_wait_time=wait)
                except ConnectionLost:
                    self._stale = True
                    raise
            if batch or loop.time() >= deadline:
                break
        out: list[Delivery] = []
        for message in batch:
            # A message msgbus cannot read is handed on with its problem: the core dead-letters it, and the
            # rest of the batch is delivered (raising here would leave all of them locked until they expire).
            record, attempt, problem = _codec.read(message, self.endpoint)
            out.append(ServiceBusDelivery(self, self.sdk, record, attempt, message, problem))
        return out

    async def _replace(self) -> None:
        """After a lost connection, attach a fresh SDK receiver with the SDK's full open timeout.

        Left to itself the SDK re-opens inside ``receive_messages``, bounded by its short ``max_wait_time``,
        which a slow handshake never meets. The old receiver's locks went with its connection.
        """
        old, self.sdk = self.sdk, self._adapter.sdk_receiver(self.endpoint)
        closing = asyncio.create_task(_quietly(old.close()))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        with translated(f"re-attach receiver to {self.endpoint}", secrets=self._secrets):
            await self.sdk.__aenter__()
        self._stale = False

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Complete each delivery; one lost lock does not stop the others. Raises the first failure after."""
        first: MsgbusError | None = None
        async with self.lock:  # one turn for the whole batch
            for delivery in deliveries:
                try:
                    with translated(f"complete on {self.endpoint}", secrets=self._secrets):
                        await _sdk(delivery).complete_message(_message(delivery))
                except MsgbusError as err:
                    first = first or err
        if first is not None:
            raise first

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._adapter._receivers.discard(self)
        for task in list(self._held):  # delayed abandons: their locks expire, the messages come back later
            task.cancel()
        await _quietly(self.sdk.close())
        if self._closing:  # let replaced receivers finish closing, or their sockets leak
            await asyncio.wait(self._closing, timeout=5)


class ServiceBusDelivery(Delivery):
    """A peek-locked message; ``raw`` is the SDK's ``ServiceBusReceivedMessage``."""

    __slots__ = ("_receiver", "_sdk")

    raw: ServiceBusReceivedMessage

    def __init__(
        self,
        receiver: ServiceBusReceiverAdapter,
        sdk: ServiceBusReceiver,
        record: Record,
        attempt: int,
        raw: ServiceBusReceivedMessage,
        problem: str | None = None,
    ) -> None:
        super().__init__(record, attempt, raw, problem)
        self._receiver = receiver
        self._sdk = sdk  # settle through the SDK receiver that received it

    async def ack(self) -> None:
        with translated(f"complete on {self._receiver.endpoint}", secrets=self._receiver._secrets):
            async with self._receiver.lock:
                await self._sdk.complete_message(self.raw)

    async def nack(self, delay: float | None = None) -> None:
        """Abandon (delivery count + 1); with ``delay``, schedule a copy carrying the attempts, then complete.

        The copy is stored before the original is completed, so a failure in between duplicates, never loses.
        """
        r = self._receiver
        if not delay:
            with translated(f"abandon on {r.endpoint}", secrets=r._secrets):
                async with r.lock:
                    await self._sdk.abandon_message(self.raw)
            return
        if r.endpoint.kind == "queue" and not r.endpoint.dead_letter:
            await r._adapter.send_messages(r.endpoint.name, [_codec.encode(self.record, self.attempt)], delay)
            await self.ack()
            return
        # A subscription cannot be sent to (a copy to the topic would reach every subscription): keep the
        # lock, renewed, for ``delay`` seconds, then abandon. If this process dies the lock simply expires.
        r.hold(self, delay)

    async def _abandon_later(self, delay: float) -> None:
        r = self._receiver
        lock = r._adapter.options.lock_duration
        remaining = delay
        try:
            while remaining > 0:
                step = min(remaining, lock / 3)
                await asyncio.sleep(step)
                remaining -= step
                if remaining > 0:
                    await self.extend(lock)
            async with r.lock:
                await self._sdk.abandon_message(self.raw)
        except Exception as exc:  # the lock expires instead: redelivered all the same
            log.debug("msgbus: delayed abandon of %s failed: %s", self.record.id, type(exc).__name__)

    async def dead_letter(self, reason: str) -> None:
        r = self._receiver
        with translated(f"dead-letter on {r.endpoint}", secrets=r._secrets):
            async with r.lock:
                await self._sdk.dead_letter_message(
                    self.raw, reason=reason[: _codec.MAX_REASON], error_description=_codec.description(self.attempt)
                )

    async def extend(self, seconds: float) -> None:
        """Renew the lock (for the entity's lock duration; ``seconds`` cannot be chosen on Service Bus)."""
        r = self._receiver
        with translated(f"renew lock on {r.endpoint}", secrets=r._secrets):
            async with r.lock:
                await self._sdk.renew_message_lock(self.raw)


def _sdk(delivery: Delivery) -> ServiceBusReceiver:
    if not isinstance(delivery, ServiceBusDelivery):
        raise TypeError(f"not a Service Bus delivery: {delivery!r}")
    return delivery._sdk


def _message(delivery: Delivery) -> ServiceBusReceivedMessage:
    if not isinstance(delivery, ServiceBusDelivery):
        raise TypeError(f"not a Service Bus delivery: {delivery!r}")
    return delivery.raw


async def _quietly(closing: Any) -> None:
    try:
        await closing
    except Exception as exc:  # closing must not raise: the connection may already be gone
        log.debug("msgbus: servicebus close failed: %s", type(exc).__name__)
