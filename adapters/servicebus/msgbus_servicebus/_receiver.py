"""Receiving from one Service Bus queue, subscription or dead-letter sub-queue: peek-locked messages pulled in
short slices, settled (complete, abandon, dead-letter, renew-lock) through the SDK receiver that received them.
The receiver holds a ``Link`` to its adapter (settings, secrets, new SDK receivers, the send, forget), not the
adapter itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol, TypeVar

from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage
from azure.servicebus.aio import ServiceBusReceiver

from msgbus.adapter import Delivery, Endpoint, Receiver, Record
from msgbus.errors import ClosedError, ConnectionLost, MsgbusError

from . import _codec
from ._config import ServiceBusOptions
from ._errors import translated

log = logging.getLogger("msgbus.servicebus")

_RECEIVE_SLICE = 0.1  # seconds one receive call may hold the SDK receiver while settlements wait
_COMPLETED = "completed"  # the update-disposition status of a completed message ($management)
_ABANDONED = "abandoned"  # ... and of an abandoned one
_D = TypeVar("_D", bound=Delivery)


class Link(Protocol):
    """What a receiver needs from its adapter: the settings and secrets, new SDK receivers, the encoding and
    send for a delayed nack's copy, and ``forget``."""

    options: ServiceBusOptions
    secrets: tuple[str | None, ...]

    def sdk_receiver(self, endpoint: Endpoint) -> ServiceBusReceiver: ...

    def encode(self, record: Record, prior_attempts: int = 0) -> ServiceBusMessage: ...

    async def send_messages(self, name: str, messages: list[ServiceBusMessage], delay: float | None) -> None: ...

    def forget(self, receiver: ServiceBusReceiverAdapter) -> None: ...


class ServiceBusReceiverAdapter(Receiver):
    """Pulls peek-locked messages with ``receive_messages``; settles through the same SDK receiver."""

    def __init__(self, adapter: Link, endpoint: Endpoint) -> None:
        self._adapter = adapter
        self.endpoint = endpoint
        self.sdk = adapter.sdk_receiver(endpoint)
        self._secrets = adapter.secrets
        self._closed = False
        self._held: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Task[None]] = set()  # old SDK receivers being closed
        self._stale = False  # the connection was lost: replace the SDK receiver before the next receive
        self._abandoning: list[ServiceBusDelivery] = []  # abandons waiting for their turn on the SDK receiver
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
        closing = asyncio.create_task(close_quietly(old.close()))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        with translated(f"re-attach receiver to {self.endpoint}", secrets=self._secrets):
            await self.sdk.__aenter__()
        self._stale = False

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Complete the deliveries; one lost lock does not stop the others. Raises the first failure after.

        Those received by the current SDK receiver are completed with one ``$management`` update-disposition
        request (one round trip for the batch, where each ``complete_message`` waits for its own echo: the
        receive and settle calls take turns on the SDK receiver, so those round trips were most of a consumer's
        time). If that request fails (a lost lock among them, say), each is completed on its own after it.
        """
        first: MsgbusError | None = None
        async with self.lock:  # one turn for the whole batch
            deliveries = await self._settle_together(_COMPLETED, deliveries)
            for delivery in deliveries:
                try:
                    with translated(f"complete on {self.endpoint}", secrets=self._secrets):
                        await _sdk(delivery).complete_message(_message(delivery))
                except MsgbusError as err:
                    first = first or err
        if first is not None:
            raise first

    async def abandon(self, delivery: ServiceBusDelivery) -> None:
        """Abandon ``delivery``. Abandons that queue up while the SDK receiver is busy go out together, in one
        management request: a stopping consumer hands back its whole prefetch in one round trip, not one each."""
        self._abandoning.append(delivery)
        async with self.lock:
            batch, self._abandoning = self._abandoning, []
            for each in await self._settle_together(_ABANDONED, batch):
                try:
                    with translated(f"abandon on {self.endpoint}", secrets=self._secrets):
                        await each._sdk.abandon_message(each.raw)
                except MsgbusError as err:
                    each.failure = err
        failure, delivery.failure = delivery.failure, None  # settled by this call or by an earlier one's batch
        if failure is not None:
            raise failure

    async def release_many(self, deliveries: Sequence[Delivery]) -> None:
        """Give back unstarted deliveries with AMQP ``released``, which counts no delivery: an abandon counts one,
        so a message handed back by ten stops would be dead-lettered unhandled, and the consumer that takes it
        over would run it alone as a suspect (``msgbus._redelivery``). Pre-settled, a frame each and no round
        trip, as the SDK releases its own buffer. Without that path (another SDK version): abandoned."""
        sdk = self.sdk
        if self._stale:
            await super().release_many(deliveries)
            return
        abandon: list[Delivery] = []
        async with self.lock:
            for delivery in deliveries:
                if _sdk(delivery) is not sdk:  # received before a reconnect: its lock went with the connection
                    continue
                call = release_call(sdk, _message(delivery))
                if call is None:
                    abandon.append(delivery)
                    continue
                try:
                    with translated(f"release on {self.endpoint}", secrets=self._secrets):
                        await call
                except MsgbusError as err:
                    log.debug("msgbus: release of %s failed (%s); abandoned", delivery.record.id, err)
                    abandon.append(delivery)
        await super().release_many(abandon)

    async def _settle_together(self, status: str, deliveries: Sequence[_D]) -> Sequence[_D]:
        """Settle those of ``deliveries`` the current SDK receiver received in one management request (under
        ``lock``); the ones left to settle one by one: the others, or all of them if the request failed."""
        sdk = self.sdk
        settle = getattr(sdk, "_settle_message_via_mgmt_link", None)  # the SDK's own fallback settlement path
        together = [d for d in deliveries if _sdk(d) is sdk]
        if settle is None or self._stale or len(together) < 2:
            return deliveries
        try:
            with translated(f"{status} at once on {self.endpoint}", secrets=self._secrets):
                await settle(status, [_message(d).lock_token for d in together])
        except MsgbusError as err:
            log.debug("msgbus: settling %d on %s at once failed (%s); one by one", len(together), self.endpoint, err)
            return deliveries
        _forget(sdk, together)
        return [d for d in deliveries if _sdk(d) is not sdk]

    async def release(self) -> None:
        """Give back what arrived on the credit a receive call left open (it waits in the SDK's buffer): released
        now, without counting a delivery, not left locked until its lock expires ("stop() hands back"). The SDK
        drains and releases the same way when it closes a receiver; this keeps the receiver open."""
        if self._stale or self._closed:
            return
        async with self.lock:
            with translated(f"release the read-ahead of {self.endpoint}", secrets=self._secrets):
                await release_read_ahead(self.sdk)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._adapter.forget(self)
        for task in list(self._held):  # delayed abandons: their locks expire, the messages come back later
            task.cancel()
        await close_quietly(self.sdk.close())
        if self._closing:  # let replaced receivers finish closing, or their sockets leak
            await asyncio.wait(self._closing, timeout=5)


class ServiceBusDelivery(Delivery):
    """A peek-locked message; ``raw`` is the SDK's ``ServiceBusReceivedMessage``."""

    __slots__ = ("_receiver", "_sdk", "failure")

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
        self.failure: MsgbusError | None = None  # why its abandon failed, when another call's batch made it

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
            await r.abandon(self)
            return
        if r.endpoint.kind == "queue" and not r.endpoint.dead_letter:
            await r._adapter.send_messages(r.endpoint.name, [r._adapter.encode(self.record, self.attempt)], delay)
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


async def release_read_ahead(sdk: ServiceBusReceiver) -> None:
    """Drain ``sdk``'s link and release what arrives on the credit a receive call left open and what waits in its
    buffer (AMQP ``released``, no delivery counted): the SDK's own close-time drain, which the SDK runs only for
    receivers without sessions. Nothing where that private path is missing (another SDK version)."""
    drain = getattr(getattr(sdk, "_amqp_transport", None), "drain_and_release_messages_async", None)
    handler = getattr(sdk, "_handler", None)
    if drain is not None and handler is not None:
        await drain(handler)


def release_call(sdk: ServiceBusReceiver, raw: ServiceBusReceivedMessage) -> Awaitable[None] | None:
    """The call that gives ``raw`` back with AMQP ``released`` (pre-settled: no delivery counted, no round trip),
    the SDK's own give-back of its buffer on close; None where that private path is missing (another SDK)."""
    settle = getattr(getattr(sdk, "_handler", None), "settle_messages_async", None)
    return None if settle is None else settle(raw._delivery_id, raw._delivery_tag, "released")


def _forget(sdk: ServiceBusReceiver, deliveries: Sequence[Delivery]) -> None:
    """Drop the delivery tags of messages completed through ``$management`` from the SDK link's set of unsettled
    ones: only a settlement on the link removes them, so a long-running receiver would keep one per message."""
    link = getattr(getattr(sdk, "_handler", None), "_link", None)
    tags = getattr(link, "_received_delivery_tags", None)
    if isinstance(tags, set):
        for delivery in deliveries:
            tags.discard(getattr(_message(delivery), "_delivery_tag", None))


def _sdk(delivery: Delivery) -> ServiceBusReceiver:
    if not isinstance(delivery, ServiceBusDelivery):
        raise TypeError(f"not a Service Bus delivery: {delivery!r}")
    return delivery._sdk


def _message(delivery: Delivery) -> ServiceBusReceivedMessage:
    if not isinstance(delivery, ServiceBusDelivery):
        raise TypeError(f"not a Service Bus delivery: {delivery!r}")
    return delivery.raw


async def close_quietly(closing: Any) -> None:
    try:
        await closing
    except Exception as exc:  # closing must not raise: the connection may already be gone
        log.debug("msgbus: servicebus close failed: %s", type(exc).__name__)
