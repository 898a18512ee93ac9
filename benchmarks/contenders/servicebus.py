"""Service Bus contender: the raw azure-servicebus ``aio`` SDK (message batches, a peek-lock receiver that
completes each message). kombu's azureservicebus transport is a blocking one (the sync SDK) for Celery's
worker; FastStream has no Service Bus broker."""

from __future__ import annotations

import asyncio
import importlib.metadata
import itertools
import time
from collections.abc import Sequence
from typing import Any

from azure.servicebus import ServiceBusMessage, ServiceBusReceiveMode
from azure.servicebus.aio import ServiceBusClient, ServiceBusSender

from msgbus._bench import Contender, OnBody
from msgbus._url import parse_url
from msgbus_servicebus._config import read_options

IDLE = 0.25  # seconds a receiver iteration waits for a message before the loop looks at ``stop``
_LOCAL = ("127.0.0.1", "localhost", "::1")


class AzureServiceBus(Contender):
    """azure-servicebus aio as its samples show: one ``ServiceBusClient``; a sender per queue (the SDK's
    senders are not coroutine-safe, so each concurrent sender task gets its own); a batch is one
    ``ServiceBusMessageBatch``; a consumer is one peek-lock receiver with ``prefetch_count`` = the credit
    msgbus gets, iterated with ``async for`` and ``complete_message`` per message. Messages carry a message
    id and a timestamp application property, as msgbus's do. Against the local test broker, entities are
    created on first attach (``management=none``); nothing is deleted afterwards."""

    name = "raw"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        parsed = parse_url(url)
        self.options = read_options(parsed, parsed.reader())
        self.label = f"azure-servicebus {importlib.metadata.version('azure-servicebus')} aio (peek-lock)"
        self._client: ServiceBusClient | None = None
        self._senders: dict[str, list[ServiceBusSender]] = {}
        self._ids = itertools.count()

    def versions(self) -> dict[str, str]:
        return {"azure-servicebus": importlib.metadata.version("azure-servicebus")}

    def _c(self) -> ServiceBusClient:
        assert self._client is not None, "open() first"
        return self._client

    async def open(self) -> None:
        self._client = ServiceBusClient.from_connection_string(self.options.connection_string)

    async def close(self) -> None:
        for senders in self._senders.values():
            for sender in senders:
                await sender.close()
        if self._client is not None:
            await self._client.close()

    async def server_version(self) -> str | None:
        if self.options.host not in _LOCAL:
            return None
        proton = importlib.metadata.version("python-qpid-proton")
        return f"sbbroker test double (integration/sbbroker, python-qpid-proton {proton})"

    async def _senders_for(self, queue: str, count: int) -> list[ServiceBusSender]:
        """``count`` open senders on ``queue`` (opened on first need, then kept)."""
        pool = self._senders.setdefault(queue, [])
        while len(pool) < count:
            sender = self._c().get_queue_sender(queue)
            await sender.__aenter__()
            pool.append(sender)
        return pool[:count]

    def _message(self, body: bytes) -> ServiceBusMessage:
        return ServiceBusMessage(
            body, message_id=str(next(self._ids)), application_properties={"timestamp": repr(time.time())}
        )

    async def send(self, queue: str, body: bytes) -> None:
        (sender,) = await self._senders_for(queue, 1)
        await sender.send_messages(self._message(body))

    async def _send_batch(self, sender: ServiceBusSender, bodies: Sequence[bytes]) -> None:
        batch = await sender.create_message_batch()
        for body in bodies:
            message = self._message(body)
            try:
                batch.add_message(message)
            except ValueError:  # full: send it and start the next
                await sender.send_messages(batch)
                batch = await sender.create_message_batch()
                batch.add_message(message)
        await sender.send_messages(batch)

    async def send_batch(self, queue: str, bodies: Sequence[bytes]) -> None:
        (sender,) = await self._senders_for(queue, 1)
        await self._send_batch(sender, bodies)

    async def publish(self, queue: str, bodies: Sequence[bytes], mode: str, batch: int, concurrency: int) -> None:
        if mode != "concurrent":
            await super().publish(queue, bodies, mode, batch, concurrency)
            return
        senders = await self._senders_for(queue, concurrency)

        async def task(sender: ServiceBusSender, mine: Sequence[bytes]) -> None:
            for body in mine:
                await sender.send_messages(self._message(body))

        await asyncio.gather(*(task(s, bodies[k::concurrency]) for k, s in enumerate(senders)))

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        receiver: Any = self._c().get_queue_receiver(
            queue,
            receive_mode=ServiceBusReceiveMode.PEEK_LOCK,
            prefetch_count=self.prefetch(concurrency),
            max_wait_time=IDLE,
        )
        async with receiver:
            while not stop.is_set():
                async for message in receiver:  # ends after IDLE seconds without a message
                    on_body(b"".join(message.body))
                    await receiver.complete_message(message)
                    if stop.is_set():
                        break
