"""A minimal msgbus adapter: in-process queues and topics behind ``toy://<namespace>``.

The worked example of docs/writing-an-adapter.md. It imports only the public kit (``msgbus.adapter``,
``msgbus.errors``), and ``tests/test_adapter_guide.py`` proves it with the contract suite.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from msgbus.adapter import (
    Adapter,
    BusURL,
    Capabilities,
    Delivery,
    Endpoint,
    OptionReader,
    Receiver,
    Record,
    dead_letter_record,
)
from msgbus.errors import ClosedError, ConfigError, MessageTooLarge, TopologyError


# 1. The backend itself. A real adapter talks to a broker's client library instead.
@dataclass
class _Queue:
    """Messages ready to deliver, each with how often it was delivered before, and its dead letters."""

    ready: deque[tuple[Record, int]] = field(default_factory=deque)
    dead: _Queue | None = None


@dataclass
class _Namespace:
    queues: dict[Endpoint, _Queue] = field(default_factory=dict)
    subscriptions: dict[str, set[Endpoint]] = field(default_factory=dict)  # topic -> its subscription endpoints


_NAMESPACES: dict[str, _Namespace] = {}


# 2. Deliveries: one received message and its settlement.
class ToyDelivery(Delivery):
    __slots__ = ("_receiver", "_seen")

    def __init__(self, receiver: ToyReceiver, record: Record, seen: int) -> None:
        super().__init__(record, attempt=seen + 1)
        self._receiver = receiver
        self._seen = seen + 1

    async def ack(self) -> None:
        self._receiver.settle(self)

    async def nack(self, delay: float | None = None) -> None:
        if self._receiver.settle(self):  # no delayed_nack capability: the core never passes a delay
            self._receiver.queue.ready.append((self.record, self._seen))

    async def dead_letter(self, reason: str) -> None:
        if self._receiver.settle(self):
            queue = self._receiver.queue
            if queue.dead is None:  # already a dead-letter queue: a dead letter is not dead-lettered again
                queue.ready.append((self.record, self._seen))
            else:
                record = dead_letter_record(self.record, reason, self.attempt, self._receiver.endpoint)
                queue.dead.ready.append((record, 0))


# 3. The receiver: as many deliveries as asked for (the core keeps the prefetch limit); closing gives them back.
class ToyReceiver(Receiver):
    def __init__(self, queue: _Queue, endpoint: Endpoint) -> None:
        self.queue = queue
        self.endpoint = endpoint
        self.held: set[ToyDelivery] = set()
        self.closed = False

    def settle(self, delivery: ToyDelivery) -> bool:
        """Whether ``delivery`` was still held here (a handle given back on close settles nothing)."""
        if delivery not in self.held:
            return False
        self.held.discard(delivery)
        return True

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while not self.closed:
            out: list[Delivery] = []
            while len(out) < max_messages and self.queue.ready:
                record, seen = self.queue.ready.popleft()
                delivery = ToyDelivery(self, record, seen)
                self.held.add(delivery)
                out.append(delivery)
            if out or time.monotonic() >= deadline:
                return out
            await asyncio.sleep(0.005)  # a broker would push, or long-poll
        raise ClosedError(f"receiver for {self.endpoint} is closed")

    async def close(self) -> None:
        self.closed = True
        for delivery in sorted(self.held, key=lambda d: d.record.timestamp):  # back, for other consumers
            self.queue.ready.appendleft((delivery.record, delivery._seen))
        self.held.clear()


# 4. The adapter: the connection, topology, and the send path.
class ToyAdapter(Adapter):
    coalesce_sends = False  # send never waits: nothing to gain from batching concurrent sends

    def __init__(self, url: BusURL, max_message_size: int) -> None:
        self.url = url
        self.capabilities = Capabilities(
            max_message_size=max_message_size,
            persistence="none",  # lost with the process: the suite skips the restart check
            cross_process=False,  # one process only: the suite skips the kill-a-consumer checks
            restartable=False,
        )
        self._ns = _NAMESPACES.setdefault(url.host or "", _Namespace())

    async def open(self) -> None:
        pass  # a real adapter connects here, inside ``with ERRORS.translated("connect", secrets):``

    async def close(self) -> None:
        pass

    def _queue(self, endpoint: Endpoint) -> _Queue:
        queue = self._ns.queues.get(Endpoint(endpoint.kind, endpoint.name, endpoint.subscription))
        if queue is None:
            raise TopologyError(f"toy: {endpoint} does not exist")
        return queue.dead if endpoint.dead_letter and queue.dead is not None else queue

    async def declare(self, endpoint: Endpoint, *, create: bool = True) -> None:
        subscriptions = self._ns.subscriptions
        if endpoint.kind == "topic":
            if endpoint.name not in subscriptions and not create:
                raise TopologyError(f"toy: topic {endpoint.name} does not exist")
            subscriptions.setdefault(endpoint.name, set())
            if endpoint.subscription is None:
                return
        base = Endpoint(endpoint.kind, endpoint.name, endpoint.subscription)
        if base not in self._ns.queues:
            if not create:
                raise TopologyError(f"toy: {base} does not exist")
            self._ns.queues[base] = _Queue(dead=_Queue())
            if endpoint.kind == "topic":
                subscriptions[endpoint.name].add(base)

    async def send(self, endpoint: Endpoint, records: Sequence[Record], delay: float | None = None) -> None:
        limit = self.capabilities.max_message_size
        for record in records:  # a malformed or oversized record is refused, typed, before anything is stored
            size = record.size()
            if limit is not None and size > limit:
                raise MessageTooLarge(size, limit)
        if endpoint.kind == "queue":
            targets = [self._queue(endpoint)]
        else:
            targets = [self._ns.queues[e] for e in sorted(self._ns.subscriptions.get(endpoint.name, ()), key=str)]
        for queue in targets:
            queue.ready.extend((record, 0) for record in records)

    async def receiver(self, endpoint: Endpoint, prefetch: int) -> Receiver:
        return ToyReceiver(self._queue(endpoint), endpoint)


# 5. The factory, registered under the ``msgbus.adapters`` entry-point group.
def create(url: BusURL, options: OptionReader) -> Adapter:
    """Entry point for ``toy://[namespace]``; reads ``max_message_size``."""
    if url.path not in ("", "/"):
        raise ConfigError("toy:// takes only a namespace name, e.g. toy://tests")
    return ToyAdapter(url, options.int("max_message_size", 1_048_576, min=1))
