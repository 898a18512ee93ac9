"""Pub/Sub contenders: raw google-cloud-pubsub, its batching ``PublisherClient`` with the asyncio
``SubscriberAsyncClient``'s Pull (``GoogleCloudPubSub``, the one the harness runs) or with the streaming-pull
``SubscriberClient.subscribe`` (``StreamingPull``). kombu's gcpubsub transport is a blocking one for
Celery's worker; FastStream has no Pub/Sub broker.

Why the harness's raw side pulls: the local endpoint is Google's pstest fake, which hands a streaming-pull
stream one message per 10 ms delivery tick (an unbuffered channel, ``pstest/fake.go``), so any streaming
client reads about 100 msgs/s there however fast it is. Pull answers from the backlog at once (an empty one
waits a fixed 500 ms). Against the real service or the official emulator, ``StreamingPull`` is the idiom.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import itertools
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
from google.api_core import exceptions as gx
from google.cloud import pubsub_v1
from google.pubsub_v1 import SubscriberAsyncClient
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcAsyncIOTransport, SubscriberGrpcTransport

from msgbus._bench import Contender, OnBody

ACK_DEADLINE = 60  # seconds, the subscription's: msgbus's default ``ack_deadline``
PULL_TIMEOUT = 5.0  # seconds one Pull RPC may take (pstest answers an empty one after 500 ms)
# The batching msgbus's publisher uses by default (the library's own max_latency is 10 ms).
BATCH_SETTINGS = pubsub_v1.types.BatchSettings(max_messages=1000, max_bytes=9_000_000, max_latency=0.005)
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
_GO_MOD = Path(__file__).resolve().parents[2] / "integration" / "pstest" / "go.mod"


def msgbus_resources(queue: str) -> tuple[str, ...]:
    """The topic and subscription ids msgbus gives a queue of that name (``Q~queue`` and ``Q~queue~dlq``)."""
    return (f"{queue}~queue", f"{queue}~queue~dlq")


class GoogleCloudPubSub(Contender):
    """google-cloud-pubsub: ``PublisherClient.publish`` futures awaited through ``asyncio.wrap_future`` (a
    batch hands every message to the client, then awaits them all; batching as msgbus configures it); a
    consumer loops ``SubscriberAsyncClient.pull`` of up to ``prefetch`` (the credit msgbus gets), handles
    them and ``acknowledge``s them in one call. A topic with one subscription per queue, as msgbus has;
    messages carry an id and a timestamp attribute, as msgbus's do."""

    name = "raw"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        options = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.project = parts.hostname or ""
        self.emulator = options.get("emulator_host") or os.environ.get("PUBSUB_EMULATOR_HOST")
        self.label = f"google-cloud-pubsub {importlib.metadata.version('google-cloud-pubsub')} (asyncio Pull)"
        self._publisher: Any = None
        self._subscriber: Any = None
        self._declared: set[str] = set()
        self._ids = itertools.count()

    def versions(self) -> dict[str, str]:
        return {lib: importlib.metadata.version(lib) for lib in ("google-cloud-pubsub", "grpcio")}

    async def open(self) -> None:
        if self.emulator:
            channel = grpc.insecure_channel(self.emulator, options=_CHANNEL_OPTIONS)
            self._publisher = pubsub_v1.PublisherClient(
                BATCH_SETTINGS, transport=PublisherGrpcTransport(channel=channel)
            )
            aio_channel = grpc.aio.insecure_channel(self.emulator, options=_CHANNEL_OPTIONS)
            self._subscriber = SubscriberAsyncClient(transport=SubscriberGrpcAsyncIOTransport(channel=aio_channel))
        else:
            self._publisher = pubsub_v1.PublisherClient(BATCH_SETTINGS)
            self._subscriber = SubscriberAsyncClient()

    async def close(self) -> None:
        if self._publisher is not None:
            await asyncio.to_thread(self._publisher.stop)
            await asyncio.to_thread(self._publisher.transport.close)
        if self._subscriber is not None:
            await self._subscriber.transport.close()

    async def server_version(self) -> str | None:
        if not self.emulator or not _GO_MOD.exists():
            return None
        found = re.search(r"cloud\.google\.com/go/pubsub/v2 (\S+)", _GO_MOD.read_text())
        return f"pstest (cloud.google.com/go/pubsub/v2 {found.group(1)})" if found else "pstest"

    def _topic(self, queue: str) -> str:
        return f"projects/{self.project}/topics/{queue}"

    def _subscription(self, queue: str) -> str:
        return f"projects/{self.project}/subscriptions/{queue}"

    async def _declare(self, queue: str) -> None:
        if queue in self._declared:
            return
        with contextlib.suppress(gx.AlreadyExists):
            await asyncio.to_thread(self._publisher.create_topic, name=self._topic(queue))
        with contextlib.suppress(gx.AlreadyExists):
            await self._subscriber.create_subscription(
                name=self._subscription(queue), topic=self._topic(queue), ack_deadline_seconds=ACK_DEADLINE
            )
        self._declared.add(queue)

    def _publish(self, queue: str, body: bytes) -> asyncio.Future[str]:
        future = self._publisher.publish(self._topic(queue), body, id=str(next(self._ids)), timestamp=repr(time.time()))
        return asyncio.wrap_future(future)

    async def send(self, queue: str, body: bytes) -> None:
        await self._declare(queue)
        await self._publish(queue, body)

    async def send_batch(self, queue: str, bodies: Sequence[bytes]) -> None:
        await self._declare(queue)
        await asyncio.gather(*[self._publish(queue, body) for body in bodies])

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        await self._declare(queue)
        subscription = self._subscription(queue)
        credit = self.prefetch(concurrency)
        while not stop.is_set():
            try:
                response = await self._subscriber.pull(
                    subscription=subscription, max_messages=credit, timeout=PULL_TIMEOUT
                )
            except gx.DeadlineExceeded:
                continue
            received = response.received_messages
            if not received:
                continue
            for m in received:
                on_body(m.message.data)
            await self._subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in received])

    async def cleanup(self, queue: str) -> None:
        """Delete the topic and subscription of ``queue``, and those msgbus makes for a queue of that name."""
        for name in (queue, *msgbus_resources(queue)):
            with contextlib.suppress(gx.NotFound):
                await self._subscriber.delete_subscription(subscription=self._subscription(name))
            with contextlib.suppress(gx.NotFound):
                await asyncio.to_thread(self._publisher.delete_topic, topic=self._topic(name))
        self._declared.discard(queue)


class StreamingPull(GoogleCloudPubSub):
    """The same publisher; consumes with ``SubscriberClient.subscribe(callback, FlowControl(max_messages=
    prefetch))``, whose callback, on the library's thread pool, hands each message to the event loop, where it
    is handled and ``ack()``ed (the library sends acks in batches; cancelling the stream flushes them)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.label = f"google-cloud-pubsub {importlib.metadata.version('google-cloud-pubsub')} (streaming pull)"
        self._streaming: Any = None

    async def open(self) -> None:
        await super().open()
        if self.emulator:
            channel = grpc.insecure_channel(self.emulator, options=_CHANNEL_OPTIONS)
            self._streaming = pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))
        else:
            self._streaming = pubsub_v1.SubscriberClient()

    async def close(self) -> None:
        if self._streaming is not None:
            await asyncio.to_thread(self._streaming.close)
        await super().close()

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        await self._declare(queue)
        loop = asyncio.get_running_loop()

        def handle(message: Any) -> None:
            on_body(message.data)
            message.ack()

        def callback(message: Any) -> None:  # on the library's callback threads
            loop.call_soon_threadsafe(handle, message)

        flow = pubsub_v1.types.FlowControl(max_messages=self.prefetch(concurrency))
        pulling = self._streaming.subscribe(self._subscription(queue), callback, flow_control=flow)
        try:
            await stop.wait()
        finally:
            pulling.cancel()  # stops the stream, then sends the acks still queued
            with contextlib.suppress(Exception):
                await asyncio.to_thread(pulling.result, 30)
