"""RabbitMQ contenders: raw aio-pika with publisher confirms, and FastStream's RabbitBroker (kombu: ``kombu_.py``).

Every contender declares a durable queue of the type the msgbus URL names (``queue_type``, quorum by default)
and sends persistent messages, so the broker does the same work for each.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import itertools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractIncomingMessage

from msgbus._bench import Contender, OnBody

from .faststream_ import serve


def amqp_url(url: str) -> tuple[str, dict[str, Any]]:
    """The plain AMQP URL (msgbus options stripped) and the queue arguments every contender declares."""
    parts = urlsplit(url)
    options = parse_qs(parts.query)
    queue_type = options.get("queue_type", ["quorum"])[0]
    arguments = {"x-queue-type": "quorum"} if queue_type == "quorum" else {}
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", "", "")), arguments


class AioPika(Contender):
    """aio-pika, the way its docs show: ``default_exchange.publish`` on a confirming channel; a consume
    callback that acks each message; batches and concurrent sends are ``gather`` of confirmed publishes.
    Messages carry what msgbus sets too: persistent delivery, a message id and a timestamp."""

    name = "raw"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.amqp, self.arguments = amqp_url(url)
        self.label = f"aio-pika {importlib.metadata.version('aio-pika')} (confirms)"
        self._conn: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._declared: set[str] = set()
        self._ids = itertools.count()

    def versions(self) -> dict[str, str]:
        return {lib: importlib.metadata.version(lib) for lib in ("aio-pika", "aiormq")}

    async def open(self) -> None:
        self._conn = await aio_pika.connect(self.amqp)
        self._channel = await self._conn.channel(publisher_confirms=True)
        self._exchange = self._channel.default_exchange

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def server_version(self) -> str | None:
        assert self._conn is not None
        props: Any = self._conn.transport.connection.server_properties if self._conn.transport else {}
        version = props.get("version")
        return f"RabbitMQ {version.decode() if isinstance(version, bytes) else version}"

    async def _declare(self, queue: str) -> None:
        if queue not in self._declared:
            assert self._channel is not None
            await self._channel.declare_queue(queue, durable=True, arguments=self.arguments)
            self._declared.add(queue)

    def _message(self, body: bytes) -> aio_pika.Message:
        return aio_pika.Message(
            body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(next(self._ids)),
            timestamp=datetime.now(UTC),
        )

    async def send(self, queue: str, body: bytes) -> None:
        await self._declare(queue)
        assert self._exchange is not None
        await self._exchange.publish(self._message(body), queue)

    async def send_batch(self, queue: str, bodies: Sequence[bytes]) -> None:
        await self._declare(queue)
        assert self._exchange is not None
        await asyncio.gather(*(self._exchange.publish(self._message(b), queue) for b in bodies))

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        await self._declare(queue)
        assert self._conn is not None
        channel = await self._conn.channel()
        await channel.set_qos(prefetch_count=self.prefetch(concurrency))
        q = await channel.declare_queue(queue, durable=True, arguments=self.arguments)

        async def on_message(message: AbstractIncomingMessage) -> None:
            on_body(message.body)
            await message.ack()

        tag = await q.consume(on_message)
        await stop.wait()
        await q.cancel(tag)
        await channel.close()

    async def cleanup(self, queue: str) -> None:
        """Delete ``queue`` and a ``.dlq`` beside it (msgbus's dead-letter queue), on a fresh channel each."""
        if self._conn is None:
            return
        for name in (queue, f"{queue}.dlq"):
            channel = await self._conn.channel()
            try:
                await channel.queue_delete(name)
            except aio_pika.exceptions.ChannelClosed:
                pass  # no such queue
            finally:
                if not channel.is_closed:
                    await channel.close()


class AiormqFloor(AioPika):
    """The floor of the asyncio AMQP stack, not a way to write a service: aiormq (the protocol layer under
    aio-pika) consuming with nothing on top - no handler dispatch, no message object, no decoding - and one
    ``basic.ack(multiple=True)`` per 16 deliveries (about what msgbus's ack batching sends). It publishes
    like raw aio-pika (preloading only), so it runs the consume workload alone."""

    name = "aiormq"
    modes = ("batch",)
    latency = False

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.label = f"aiormq {importlib.metadata.version('aiormq')} (bare consume floor)"

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        await self._declare(queue)
        assert self._conn is not None and self._conn.transport is not None
        channel = await self._conn.transport.connection.channel()
        await channel.basic_qos(prefetch_count=self.prefetch(concurrency))
        last, unacked = 0, 0

        async def on_message(message: Any) -> None:
            nonlocal last, unacked
            on_body(message.body)
            last, unacked = message.delivery.delivery_tag, unacked + 1
            if unacked >= 16:
                unacked = 0
                await channel.basic_ack(last, multiple=True)

        tag = (await channel.basic_consume(queue, on_message)).consumer_tag
        await stop.wait()
        if tag is not None:
            await channel.basic_cancel(tag)
        if unacked:
            await channel.basic_ack(last, multiple=True)
        await channel.close()


class FastStream(Contender):
    """FastStream's RabbitBroker: ``broker.publish(persist=True)`` (confirming channel by default), and a
    subscriber with ``AckPolicy.ACK`` (ack after the handler) on a channel with the same prefetch."""

    name = "faststream"
    modes = ("single", "concurrent")  # no batch publish for RabbitMQ

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.amqp, self.arguments = amqp_url(url)
        self.label = f"FastStream {importlib.metadata.version('faststream')} RabbitBroker"
        self._broker: Any = None
        self._declared: set[str] = set()

    def versions(self) -> dict[str, str]:
        return {"faststream": importlib.metadata.version("faststream")}

    def _queue(self, queue: str) -> Any:
        from faststream.rabbit import RabbitQueue

        make: Any = RabbitQueue  # its overloads want a literal queue type; ours comes from the URL
        return make(queue, durable=True, arguments=self.arguments)

    async def open(self) -> None:
        from faststream.rabbit import RabbitBroker

        self._broker = RabbitBroker(self.amqp, logger=None)  # no per-message log lines
        await self._broker.start()

    async def close(self) -> None:
        if self._broker is not None:
            await self._broker.stop()

    async def _declare(self, queue: str) -> None:
        if queue not in self._declared:
            await self._broker.declare_queue(self._queue(queue))
            self._declared.add(queue)

    async def send(self, queue: str, body: bytes) -> None:
        await self._declare(queue)
        await self._broker.publish(body, queue=queue, persist=True)

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        from faststream import AckPolicy
        from faststream.rabbit import Channel

        await self._declare(queue)
        subscriber = self._broker.subscriber(
            self._queue(queue), channel=Channel(prefetch_count=self.prefetch(concurrency)), ack_policy=AckPolicy.ACK
        )
        await serve(subscriber, on_body, stop)
