"""Redis contenders: raw redis-py streams (pipelined XADD, XREADGROUP batches, XACK+XDEL) and FastStream's
RedisBroker on a stream with a consumer group (kombu: ``kombu_.py``, list-based)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import itertools
import secrets
import time
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
from redis import exceptions as rx

from msgbus._bench import Contender, OnBody

from .faststream_ import serve

GROUP = "bench"


def plain_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


async def ensure_group(client: redis.asyncio.Redis, stream: str) -> None:
    try:
        await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except rx.ResponseError as exc:
        if not str(exc).startswith("BUSYGROUP"):
            raise


class RedisPy(Contender):
    """redis-py, fastest idiomatic: XADD (batches pipelined, no transaction); a consumer reads XREADGROUP
    batches of ``prefetch`` entries, handles them, and settles each batch with one pipelined XACK + XDEL
    (the same deletion msgbus does on a single-group stream, so both keep the stream short). Entries carry
    what a service needs and msgbus writes too: the body, a message id and a timestamp."""

    name = "raw"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.label = f"redis-py {importlib.metadata.version('redis')} (streams)"
        self._client: redis.asyncio.Redis | None = None
        self._ids = itertools.count()

    def versions(self) -> dict[str, str]:
        return {"redis": importlib.metadata.version("redis")}

    def _c(self) -> redis.asyncio.Redis:
        assert self._client is not None
        return self._client

    async def open(self) -> None:
        self._client = redis.asyncio.Redis.from_url(plain_url(self.url))
        await self._client.ping()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def server_version(self) -> str | None:
        info: Any = await self._c().info("server")
        return f"Redis {info.get('redis_version')}"

    def _fields(self, body: bytes) -> dict[bytes, bytes]:
        return {b"body": body, b"id": b"%d" % next(self._ids), b"timestamp": repr(time.time()).encode()}

    async def send(self, queue: str, body: bytes) -> None:
        await self._c().xadd(queue, self._fields(body))  # type: ignore[arg-type]

    async def send_batch(self, queue: str, bodies: Sequence[bytes]) -> None:
        pipe = self._c().pipeline(transaction=False)
        for body in bodies:
            pipe.xadd(queue, self._fields(body))  # type: ignore[arg-type]
        await pipe.execute()

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        client = self._c()
        await ensure_group(client, queue)
        consumer = f"c-{secrets.token_hex(4)}"
        count = self.prefetch(concurrency)
        while not stop.is_set():
            reply: Any = await client.xreadgroup(GROUP, consumer, {queue: ">"}, count=count, block=100)
            if not reply:
                continue
            entries = reply[0][1]
            for _, fields in entries:
                on_body(fields[b"body"])
            ids = [entry_id for entry_id, _ in entries]
            pipe = client.pipeline(transaction=False)
            pipe.xack(queue, GROUP, *ids)
            pipe.xdel(queue, *ids)
            await pipe.execute()

    async def cleanup(self, queue: str) -> None:
        """Delete ``queue``'s stream and every key named after it (msgbus's streams carry a prefix)."""
        client = self._c()
        keys = [queue, *[k async for k in client.scan_iter(match=f"*{{q:{queue}}}*")]]
        await client.delete(*keys)


class FastStream(Contender):
    """FastStream's RedisBroker: ``publish(stream=...)`` (batches through its ``pipeline=`` argument) and a
    ``StreamSub`` subscriber in a consumer group with ``AckPolicy.ACK`` (XACK after the handler)."""

    name = "faststream"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.label = f"FastStream {importlib.metadata.version('faststream')} RedisBroker (streams)"
        self._broker: Any = None
        self._client: redis.asyncio.Redis | None = None

    def versions(self) -> dict[str, str]:
        return {"faststream": importlib.metadata.version("faststream")}

    async def open(self) -> None:
        from faststream.redis import RedisBroker

        self._broker = RedisBroker(plain_url(self.url), logger=cast(Any, None))  # no per-message log lines
        await self._broker.start()
        self._client = redis.asyncio.Redis.from_url(plain_url(self.url))  # for pipelines and cleanup

    async def close(self) -> None:
        if self._broker is not None:
            await self._broker.stop()
        if self._client is not None:
            await self._client.aclose()

    async def send(self, queue: str, body: bytes) -> None:
        await self._broker.publish(body, stream=queue)

    async def send_batch(self, queue: str, bodies: Sequence[bytes]) -> None:
        assert self._client is not None
        async with self._client.pipeline(transaction=False) as pipe:
            for body in bodies:
                await self._broker.publish(body, stream=queue, pipeline=pipe)
            await pipe.execute()

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        from faststream import AckPolicy
        from faststream.redis import StreamSub

        assert self._client is not None
        await ensure_group(self._client, queue)
        stream = StreamSub(queue, group=GROUP, consumer=f"c-{secrets.token_hex(4)}")
        subscriber = self._broker.subscriber(stream=stream, ack_policy=AckPolicy.ACK)
        await serve(subscriber, on_body, stop)

    async def cleanup(self, queue: str) -> None:
        if self._client is not None:
            await self._client.delete(queue)
