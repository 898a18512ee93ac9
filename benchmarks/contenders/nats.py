"""NATS JetStream contenders: raw nats-py (publish with acks, a durable pull consumer fetching batches) and
FastStream's NatsBroker on the same kind of stream."""

from __future__ import annotations

import asyncio
import importlib.metadata
import itertools
import time
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from msgbus._bench import Contender, OnBody

from .faststream_ import serve

DURABLE = "bench"


def plain_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


async def ensure_queue(js: Any, name: str) -> None:
    """A work-queue stream named and subjected ``name`` with one durable pull consumer, as msgbus makes them."""
    config = StreamConfig(name=name, subjects=[name], retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE)
    await js.add_stream(config)
    await js.add_consumer(name, ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, ack_wait=30))


class NatsPy(Contender):
    """nats-py, fastest idiomatic: ``js.publish`` per message (waits for the stream's ack); batches go out with
    ``publish_async`` and then await every ack; a durable pull consumer ``fetch``es ``prefetch`` messages,
    handles them and acks each. Messages carry a ``Nats-Msg-Id`` and a timestamp header, as msgbus's do."""

    name = "raw"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.label = f"nats-py {importlib.metadata.version('nats-py')} (JetStream, pull consumer)"
        self._nc: Any = None
        self._js: Any = None
        self._streams: set[str] = set()
        self._ids = itertools.count()

    def versions(self) -> dict[str, str]:
        return {"nats-py": importlib.metadata.version("nats-py")}

    async def open(self) -> None:
        self._nc = await nats.connect(plain_url(self.url))
        self._js = self._nc.jetstream()

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()

    async def server_version(self) -> str | None:
        return f"nats-server {self._nc._server_info.get('version')}" if self._nc is not None else None

    async def _ready(self, queue: str) -> None:
        if queue not in self._streams:
            await ensure_queue(self._js, queue)
            self._streams.add(queue)

    def _headers(self) -> dict[str, str]:
        return {"Nats-Msg-Id": str(next(self._ids)), "ts": repr(time.time())}

    async def send(self, queue: str, body: bytes) -> None:
        await self._ready(queue)
        await self._js.publish(queue, body, headers=self._headers())

    async def send_batch(self, queue: str, bodies: Sequence[bytes]) -> None:
        await self._ready(queue)
        futures = [await self._js.publish_async(queue, body, headers=self._headers()) for body in bodies]
        await asyncio.gather(*futures)

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        await self._ready(queue)
        sub = await self._js.pull_subscribe_bind(DURABLE, stream=queue)
        count = self.prefetch(concurrency)
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(count, timeout=0.5)
                except TimeoutError:  # nats-py raises its own subclass or asyncio's, depending on the path
                    continue
                for msg in msgs:
                    on_body(msg.data)
                    await msg.ack()
        finally:
            await sub.unsubscribe()

    async def cleanup(self, queue: str) -> None:
        """Delete ``queue``'s stream and the ones msgbus made for a queue of that name."""
        for stream in (queue, f"msgbus_q_{queue}", f"msgbus_dq_{queue}"):
            try:
                await self._js.delete_stream(stream)
            except NotFoundError:
                pass
        self._streams.discard(queue)


class FastStream(Contender):
    """FastStream's NatsBroker: ``publish(subject, stream=...)`` (waits for the JetStream ack; no batch send) and a
    pull subscriber (``PullSub(batch_size=prefetch)``) on a durable consumer with ``AckPolicy.ACK``."""

    name = "faststream"
    modes = ("single", "concurrent")

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.label = f"FastStream {importlib.metadata.version('faststream')} NatsBroker (JetStream, pull)"
        self._broker: Any = None
        self._streams: set[str] = set()

    def versions(self) -> dict[str, str]:
        return {"faststream": importlib.metadata.version("faststream")}

    async def open(self) -> None:
        from faststream.nats import NatsBroker

        self._broker = NatsBroker(plain_url(self.url), logger=cast(Any, None))  # no per-message log lines
        await self._broker.start()

    async def close(self) -> None:
        if self._broker is not None:
            await self._broker.stop()

    async def _ready(self, queue: str) -> None:
        if queue not in self._streams:
            nc = await nats.connect(plain_url(self.url))
            try:
                await ensure_queue(nc.jetstream(), queue)
            finally:
                await nc.close()
            self._streams.add(queue)

    async def send(self, queue: str, body: bytes) -> None:
        await self._ready(queue)
        await self._broker.publish(body, queue, stream=queue)

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        from faststream import AckPolicy as FsAck
        from faststream.nats import JStream, PullSub

        await self._ready(queue)
        subscriber = self._broker.subscriber(
            queue,
            stream=JStream(queue, declare=False),
            durable=DURABLE,
            pull_sub=PullSub(batch_size=self.prefetch(concurrency), timeout=0.5),
            ack_policy=FsAck.ACK,
        )
        await serve(subscriber, on_body, stop)

    async def cleanup(self, queue: str) -> None:
        self._streams.discard(queue)
