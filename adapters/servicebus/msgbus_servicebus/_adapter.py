"""The Service Bus adapter on the azure-servicebus ``aio`` SDK: queue = queue, topic = topic,
subscription = subscription, peek-lock receivers, native dead-lettering and scheduled messages.

See ``docs/adapters/servicebus.md`` for the mapping and what differs from other backends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.servicebus import ServiceBusMessage, ServiceBusReceiveMode, ServiceBusSubQueue
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver, ServiceBusSender

from msgbus.adapter import Adapter, BusURL, Capabilities, Endpoint, OptionReader, Receiver, Record, deleted_queue
from msgbus.errors import ClosedError, InvalidMessage, MessageTooLarge

from . import _codec
from ._config import ServiceBusOptions, read_options
from ._errors import translated
from ._names import check_entity, entity
from ._receiver import ServiceBusReceiverAdapter, close_quietly
from ._sessions import SessionReceiver, with_session
from ._topology import Topology

__all__ = ["ServiceBusAdapter", "create"]


def create(url: BusURL, options: OptionReader) -> ServiceBusAdapter:
    """Entry point for ``servicebus://`` URLs; does no I/O."""
    return ServiceBusAdapter(url, read_options(url, options))


class ServiceBusAdapter(Adapter):
    """One ``ServiceBusClient``; a cached sender per queue/topic; a receiver per consumer."""

    # The credit of one receive call: every message received is locked at once, and a lock renewal is a round
    # trip per message, so the default stays what run() needs for its workers (2 per worker) until the
    # receiver's consume path is measured at more (issue 20's Service Bus part).
    credit = 16

    def __init__(self, url: BusURL, options: ServiceBusOptions) -> None:
        self.url = url
        self.options = options
        self.capabilities = Capabilities(
            ordering=options.ordering,  # per_key: sessions, the key is the session id (``_sessions``)
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
            # Duplicate detection (duplicate_detection / dedup_window): the MessageId is ``dedup_key`` (``_codec``)
            dedup_window=options.dedup_window,
        )
        self.secrets: tuple[str | None, ...] = (options.key,)
        self._client: ServiceBusClient | None = None
        self._senders: dict[str, ServiceBusSender] = {}
        self._send_locks: dict[str, asyncio.Lock] = {}  # an SDK sender is not safe for concurrent calls
        self._sender_lock = asyncio.Lock()
        self._receivers: set[Receiver] = set()
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
            with translated("connect", secrets=self.secrets):
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
            await close_quietly(sender.close())
        await self._topology.close()
        if self._client is not None:
            await close_quietly(self._client.close())

    async def ping(self) -> None:
        """The namespace's properties (``management=admin``), else a sender link attached and closed again."""
        await self._topology.ping(self.client)

    async def declare(self, endpoint: Endpoint, *, create: bool = True) -> None:
        """Create (``management=admin``) or check the entity; see ``_topology``."""
        entity(endpoint)
        if endpoint.subscription is not None:
            check_entity("subscription", endpoint.subscription, 50)
        await self._topology.declare(endpoint, create=create, client=self.client)

    async def delete(self, endpoint: Endpoint) -> None:
        """Delete the queue with its dead letters (``management=admin`` only, else ``CapabilityMissing``)."""
        name = entity(Endpoint("queue", deleted_queue(endpoint)))
        sender = self._senders.pop(name, None)
        if sender is not None:
            await close_quietly(sender.close())
        await self._topology.delete(Endpoint("queue", name))

    async def _sender(self, name: str) -> ServiceBusSender:
        sender = self._senders.get(name)
        if sender is None:
            async with self._sender_lock:
                sender = self._senders.get(name)
                if sender is None:
                    sender = self.client.get_queue_sender(name)  # a topic sender is the same link
                    with translated(f"open sender for {name!r}", secrets=self.secrets):
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
        messages = [self.encode(r) for r in records]
        if self.options.ordering == "per_key":
            messages = [with_session(m, r) for m, r in zip(messages, records, strict=True)]
        await self.send_messages(entity(endpoint), messages, delay)

    def encode(self, record: Record, prior_attempts: int = 0) -> ServiceBusMessage:
        """The message for ``record`` on this bus's entities (with or without duplicate detection)."""
        return _codec.encode(record, prior_attempts, dedup=self.options.dedup_window is not None)

    async def send_messages(self, name: str, messages: list[ServiceBusMessage], delay: float | None) -> None:
        sender = await self._sender(name)
        async with self._send_locks.setdefault(name, asyncio.Lock()):
            await self._send_locked(sender, name, messages, delay)

    async def _send_locked(
        self, sender: ServiceBusSender, name: str, messages: list[ServiceBusMessage], delay: float | None
    ) -> None:
        with translated(f"send to {name!r}", publish=True, secrets=self.secrets):
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
        entity(endpoint)
        if endpoint.kind == "topic":
            if endpoint.subscription is None:
                raise ValueError("receiving from a topic needs a subscription")
            check_entity("subscription", endpoint.subscription, 50)
        receiver: ServiceBusReceiverAdapter | SessionReceiver
        if self.options.ordering == "per_key" and not endpoint.dead_letter:  # a dead-letter queue has no sessions
            receiver = SessionReceiver(self, endpoint, prefetch)  # one unsettled message per session
        else:
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

    def forget(self, receiver: Receiver) -> None:
        """Called by a receiver that closed: ``close()`` need not close it again."""
        self._receivers.discard(receiver)
