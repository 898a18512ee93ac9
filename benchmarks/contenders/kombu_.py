"""kombu, on RabbitMQ (py-amqp with ``confirm_publish``) and Redis (its list-based transport).

kombu is blocking: each workload runs as one loop in a worker thread (one thread hop per run, not per
message). It has no batch or asyncio send, so only single sends and the consume run are measured.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from msgbus._bench import Contender, OnBody

from .rabbitmq import amqp_url

kombu: Any = importlib.import_module("kombu")  # untyped


class Kombu(Contender):
    """``Producer.publish(delivery_mode=2)`` awaiting each confirm; ``Consumer(on_message=...)`` acking each."""

    name = "kombu"
    modes = ("single",)
    latency = False

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.label = f"kombu {importlib.metadata.version('kombu')}"
        self.options: dict[str, Any] = {}
        self.arguments: dict[str, Any] = {}
        if url.startswith("amqp"):
            plain, self.arguments = amqp_url(url)
            parts = urlsplit(plain)
            # kombu spells the vhost "/" as "//"; confirm_publish makes publish wait for the broker's ack.
            self.kombu_url = urlunsplit(("pyamqp", parts.netloc, "/" + parts.path, "", ""))
            self.options = {"confirm_publish": True}
            self.label += " (py-amqp, confirm_publish)"
        else:
            parts = urlsplit(url)
            self.kombu_url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
            self.label += " (redis transport: lists)"
        self._conn: Any = None
        self._producer: Any = None
        self._declared: set[str] = set()

    def versions(self) -> dict[str, str]:
        libs = ["kombu", "amqp"] if self.kombu_url.startswith("pyamqp") else ["kombu"]
        return {lib: importlib.metadata.version(lib) for lib in libs}

    def _queue(self, name: str) -> Any:
        return kombu.Queue(
            name, kombu.Exchange("", type="direct"), routing_key=name, durable=True, queue_arguments=self.arguments
        )

    def _connect(self) -> None:
        self._conn = kombu.Connection(self.kombu_url, transport_options=self.options)
        self._conn.connect()
        self._producer = self._conn.Producer()

    async def open(self) -> None:
        await asyncio.to_thread(self._connect)

    async def close(self) -> None:
        if self._conn is not None:
            await asyncio.to_thread(self._conn.release)

    def _publish(self, queue: str, bodies: Sequence[bytes]) -> None:
        declare = [] if queue in self._declared else [self._queue(queue)]
        self._declared.add(queue)
        for body in bodies:
            self._producer.publish(body, exchange="", routing_key=queue, delivery_mode=2, declare=declare)
            declare = []

    async def send(self, queue: str, body: bytes) -> None:
        await asyncio.to_thread(self._publish, queue, [body])

    async def publish(self, queue: str, bodies: Sequence[bytes], mode: str, batch: int, concurrency: int) -> None:
        await asyncio.to_thread(self._publish, queue, bodies)  # every mode: one confirmed publish at a time

    def _consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        assert self._conn is not None
        conn = self._conn

        def on_message(message: Any) -> None:
            on_body(message.body)
            message.ack()

        with kombu.Consumer(
            conn, [self._queue(queue)], on_message=on_message, prefetch_count=self.prefetch(concurrency)
        ):
            while not stop.is_set():  # reading the flag from this thread is safe; setting it is the loop's job
                try:
                    conn.drain_events(timeout=0.1)
                except TimeoutError:  # socket.timeout
                    pass

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        await asyncio.to_thread(self._consume, queue, on_body, concurrency, stop)

    def _delete(self, queue: str) -> None:
        assert self._conn is not None
        self._queue(queue)(self._conn.default_channel).delete()

    async def cleanup(self, queue: str) -> None:
        await asyncio.to_thread(self._delete, queue)
