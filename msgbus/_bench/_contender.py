"""What a benchmark measures and how it counts: the ``Contender`` interface (msgbus here, raw clients and peer
libraries in ``benchmarks/contenders/``), message bodies that carry a run tag and an index, and the ``Tally`` that
turns a lost, duplicated or foreign message into ``LostMessages`` instead of a figure.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import importlib.metadata
import re
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgbus
from msgbus._bus import default_prefetch

_HEAD = struct.Struct("<IId")  # run tag, index, send time (time.perf_counter) -> 16 bytes


class LostMessages(Exception):
    """A run did not get back exactly what it sent: the figure would be garbage, so there is none."""


def make_body(tag: int, index: int, size: int, sent: float = 0.0) -> bytes:
    """A body of ``size`` bytes (at least 16) that names its run and its index."""
    head = _HEAD.pack(tag, index, sent)
    return head + b"x" * (size - len(head)) if size > len(head) else head


def read_body(body: bytes) -> tuple[int, int, float]:
    """(run tag, index, send time) of a body made by ``make_body``."""
    return _HEAD.unpack_from(body)


class Tally:
    """Counts the bodies of one run: distinct indexes, duplicates, and strays (bodies of another run)."""

    def __init__(self, tag: int, expected: int, on_complete: Callable[[], None] | None = None) -> None:
        self.tag = tag
        self.expected = expected
        self.seen = bytearray(expected)
        self.distinct = 0
        self.duplicates = 0
        self.strays = 0
        self.completed_at = 0.0  # time.perf_counter() when the last one arrived
        self.on_complete = on_complete

    def add(self, body: bytes) -> None:
        """Count one delivered body."""
        try:
            tag, index, _ = _HEAD.unpack_from(body)
        except struct.error:
            self.strays += 1
            return
        if tag != self.tag or index >= self.expected:
            self.strays += 1
            return
        if self.seen[index]:
            self.duplicates += 1
            return
        self.seen[index] = 1
        self.distinct += 1
        if self.distinct == self.expected:
            self.completed_at = time.perf_counter()
            if self.on_complete is not None:
                self.on_complete()

    @property
    def complete(self) -> bool:
        return self.distinct == self.expected

    def check(self, what: str) -> None:
        """Raise ``LostMessages`` unless every message arrived exactly once."""
        if self.distinct != self.expected or self.duplicates or self.strays:
            raise LostMessages(
                f"{what}: sent {self.expected}, received {self.distinct} distinct "
                f"(lost {self.expected - self.distinct}, duplicates {self.duplicates}, strays {self.strays})"
            )


OnBody = Callable[[bytes], None]


class Contender(abc.ABC):
    """One way of talking to a broker. Subclasses implement connect/send/consume the fastest idiomatic way."""

    name = "?"  # short column name: msgbus, raw, kombu, faststream
    label = "?"  # what it is: "aio-pika 10.2 (confirms)"
    modes: tuple[str, ...] = ("single", "batch", "concurrent")  # the publish modes it has
    latency = True  # can run the latency workload
    credit: int | None = None  # the consume workload's prefetch; None: msgbus's default for run(concurrency=C)

    def __init__(self, url: str) -> None:
        self.url = url

    def prefetch(self, concurrency: int) -> int:
        """The credit every contender grants when consuming: ``credit``, else what msgbus's ``run(concurrency=C)``
        takes by default on this URL (the adapter's natural credit, at least ``2C``), so the defaults row
        compares msgbus at its defaults with the raw client at the same credit."""
        if self.credit:
            return self.credit
        return default_prefetch(msgbus.connect(self.url).adapter, 2 * concurrency)

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect (untimed)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect."""

    def versions(self) -> dict[str, str]:
        """Library name -> version, for the report."""
        return {}

    async def server_version(self) -> str | None:
        """The broker's version, if this contender can ask."""
        return None

    @abc.abstractmethod
    async def send(self, queue: str, body: bytes) -> None:
        """Send one message; return once the broker confirmed it."""

    async def send_batch(self, queue: str, bodies: Sequence[bytes]) -> None:
        """Send a batch (pipelined / native batch); return once every one was confirmed."""
        raise NotImplementedError

    async def publish(self, queue: str, bodies: Sequence[bytes], mode: str, batch: int, concurrency: int) -> None:
        """Send ``bodies``: ``single`` awaits each send, ``batch`` sends batches, ``concurrent`` runs tasks."""
        if mode == "single":
            for body in bodies:
                await self.send(queue, body)
        elif mode == "batch":
            for i in range(0, len(bodies), batch):
                await self.send_batch(queue, bodies[i : i + batch])
        else:

            async def sender(mine: Sequence[bytes]) -> None:
                for body in mine:
                    await self.send(queue, body)

            await asyncio.gather(*(sender(bodies[k::concurrency]) for k in range(concurrency)))

    @abc.abstractmethod
    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        """Consume with ack, calling ``on_body`` once per delivery, until ``stop`` is set; then settle and return.

        ``on_body`` may be called from one thread other than the loop's (a blocking client); ``stop`` is set
        on the loop.
        """

    async def cleanup(self, queue: str) -> None:  # noqa: B027 - optional hook
        """Remove what ``queue`` left on the broker (best effort)."""


class MsgbusContender(Contender):
    """msgbus through its public API: ``send``/``send_many`` and ``consumer.run(handler, concurrency=C)``."""

    name = "msgbus"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.label = f"msgbus {msgbus.__version__}"
        self._bus: msgbus.Bus | None = None
        self.keys = 0  # > 0: ``publish`` gives each body the key ``k<index mod keys>`` (the ordering workload)

    async def open(self) -> None:
        self._bus = msgbus.connect(self.url)
        await self._bus.open()

    async def close(self) -> None:
        if self._bus is not None:
            await self._bus.close()

    def _b(self) -> msgbus.Bus:
        assert self._bus is not None, "open() first"
        return self._bus

    def versions(self) -> dict[str, str]:
        """msgbus, the adapter package serving this URL's scheme, and the client libraries it depends on."""
        found = {"msgbus": msgbus.__version__}
        scheme = self.url.split(":", 1)[0]
        for ep in importlib.metadata.entry_points(group="msgbus.adapters", name=scheme):
            if ep.dist is None or ep.dist.name == "msgbus":
                continue
            found[ep.dist.name] = ep.dist.version
            for requirement in ep.dist.requires or ():
                parsed = re.match(r"([\w.-]+)(?:\[([^]]*)\])?", requirement)
                if parsed is None:
                    continue
                name, extras = parsed.groups()
                # an extra usually installs the package of its name too (redis[hiredis] -> hiredis)
                for lib in (name, *(extras or "").split(",")):
                    try:
                        found[lib.strip()] = importlib.metadata.version(lib.strip())
                    except (importlib.metadata.PackageNotFoundError, ValueError):
                        pass  # not installed (an optional extra), or no name
        return found

    async def send(self, queue: str, body: bytes) -> None:
        await self._b().producer(queue).send(body)

    async def send_batch(self, queue: str, bodies: Sequence[bytes]) -> None:
        await self._b().producer(queue).send_many(bodies)

    @property
    def ordering(self) -> str:
        """The ordering the opened bus declares (``none`` or ``per_key``)."""
        return self._b().capabilities.ordering

    async def publish(self, queue: str, bodies: Sequence[bytes], mode: str, batch: int, concurrency: int) -> None:
        producer = self._b().producer(queue)  # one producer, as a service would hold it
        if self.keys:
            keys = self.keys
            keyed = [msgbus.Outgoing(body, key=f"k{read_body(body)[1] % keys}") for body in bodies]
            for i in range(0, len(keyed), batch):  # in send order: each key's messages in index order
                await producer.send_many(keyed[i : i + batch])
        elif mode == "single":
            for body in bodies:
                await producer.send(body)
        elif mode == "batch":
            for i in range(0, len(bodies), batch):
                await producer.send_many(bodies[i : i + batch])
        else:
            await super().publish(queue, bodies, mode, batch, concurrency)

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        # Not ``async with``: a consumer opened before run() keeps the prefetch it was opened with (16), while
        # run(concurrency=C) on an unopened one gets its documented default, max(2 * C, 16).
        consumer = self._b().consumer(queue, prefetch=self.credit)

        async def handle(msg: msgbus.Message[Any]) -> None:
            on_body(msg.payload)

        try:
            task = asyncio.create_task(consumer.run(handle, concurrency=concurrency))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
            consumer.stop()
            stopping.cancel()
            await task
        finally:
            await consumer.close()


def load_contender(factory: str, url: str) -> Contender:
    """``module:Class`` -> an instance for ``url``."""
    module, _, attr = factory.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    contender: Contender = cls(url)
    return contender
