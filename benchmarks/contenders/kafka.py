"""Kafka contender: raw aiokafka with an idempotent ``acks=all`` producer and manual commits per fetch."""

from __future__ import annotations

import asyncio
import importlib.metadata
import itertools
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from msgbus._bench import Contender, OnBody

from .faststream_ import serve


class AioKafka(Contender):
    """aiokafka: ``send_and_wait`` per message; batches hand every record to the producer, then await all
    acks; a group member ``getmany``s up to ``prefetch`` records and ``commit()``s after handling them.
    Records carry an id and a timestamp header, as msgbus's do.
    Topics get the partition count of the msgbus URL (``partitions``, 8 by default)."""

    name = "raw"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        self.bootstrap = parts.netloc
        self.partitions = int(parse_qs(parts.query).get("partitions", ["8"])[0])
        self.label = f"aiokafka {importlib.metadata.version('aiokafka')} (acks=all, idempotent)"
        self._producer: Any = None
        self._admin: Any = None
        self._topics: set[str] = set()
        self._ids = itertools.count()

    def versions(self) -> dict[str, str]:
        return {"aiokafka": importlib.metadata.version("aiokafka")}

    async def open(self) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await self._admin.start()
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True)
        await self._producer.start()

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
        if self._admin is not None:
            await self._admin.close()

    async def server_version(self) -> str | None:
        try:  # the version the local launcher runs (the wire protocol does not tell)
            from integration import brokers  # noqa: F401  (imports the launchers in their order)
            from integration._kafka import kafka_version
        except ImportError:
            return None
        return f"Apache Kafka {kafka_version()}"

    async def _topic(self, topic: str) -> None:
        if topic not in self._topics:
            try:
                await self._admin.create_topics([NewTopic(topic, self.partitions, 1)])
            except TopicAlreadyExistsError:
                pass
            self._topics.add(topic)

    def _headers(self) -> list[tuple[str, bytes]]:
        return [("id", b"%d" % next(self._ids)), ("timestamp", repr(time.time()).encode())]

    async def send(self, queue: str, body: bytes) -> None:
        await self._topic(queue)
        await self._producer.send_and_wait(queue, body, headers=self._headers())

    async def send_batch(self, queue: str, bodies: Sequence[bytes]) -> None:
        await self._topic(queue)
        acks = [await self._producer.send(queue, body, headers=self._headers()) for body in bodies]
        await asyncio.gather(*acks)

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        await self._topic(queue)
        consumer = AIOKafkaConsumer(
            queue,
            bootstrap_servers=self.bootstrap,
            group_id=f"{queue}-group",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=100, max_records=self.prefetch(concurrency))
                if not batches:
                    continue
                for records in batches.values():
                    for record in records:
                        on_body(record.value)
                await consumer.commit()
        finally:
            await consumer.stop()

    async def cleanup(self, queue: str) -> None:
        if queue in self._topics:
            await self._admin.delete_topics([queue])


class FastStream(AioKafka):
    """FastStream's KafkaBroker with the same ``acks=all`` idempotent producer: ``publish`` per message,
    ``publish_batch`` for batches, and a subscriber in a consumer group with ``AckPolicy.ACK`` (its
    at-least-once mode: a commit after each handled message) on ``concurrency`` workers."""

    name = "faststream"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.label = f"FastStream {importlib.metadata.version('faststream')} KafkaBroker (commit per message)"
        self._broker: Any = None

    def versions(self) -> dict[str, str]:
        return {"faststream": importlib.metadata.version("faststream")}

    async def open(self) -> None:
        from faststream.kafka import KafkaBroker

        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await self._admin.start()
        broker: Any = KafkaBroker  # its overloads want literal option types
        # publish_batch packs one producer batch: room for the harness's 100 x 1 KiB (aiokafka's default 16 KiB)
        self._broker = broker(
            self.bootstrap, acks="all", enable_idempotence=True, max_batch_size=256 * 1024, logger=None
        )
        await self._broker.start()

    async def close(self) -> None:
        if self._broker is not None:
            await self._broker.stop()
        if self._admin is not None:
            await self._admin.close()

    async def send(self, queue: str, body: bytes) -> None:
        await self._topic(queue)
        await self._broker.publish(body, topic=queue, headers=self._text_headers())

    async def send_batch(self, queue: str, bodies: Sequence[bytes]) -> None:
        await self._topic(queue)
        await self._broker.publish_batch(*bodies, topic=queue, headers=self._text_headers())

    def _text_headers(self) -> dict[str, str]:
        return {name: value.decode() for name, value in self._headers()}

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        from faststream import AckPolicy

        await self._topic(queue)
        subscriber = self._broker.subscriber(
            queue,
            group_id=f"{queue}-faststream",
            auto_offset_reset="earliest",
            ack_policy=AckPolicy.ACK,
            max_records=self.prefetch(concurrency),
        )
        await serve(subscriber, on_body, stop)
