"""``Adapter.delete`` against every real broker: a bus's reply queue exists after a request and is gone after
``close()`` (looked up with ``declare(create=False)`` on another connection, which raises ``TopologyError`` for a
missing queue or dead-letter destination); deleting removes the queue with its messages and dead letters, twice is
fine, and a neighbour queue keeps every message; a hostile name is refused typed or deletes only itself.
Service Bus runs here with ``management=none`` (the test broker serves no ATOM API): delete is ``CapabilityMissing``
and the reply queue stays, as docs/guide.md says."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

import msgbus
from integration.brokers import Endpoint as Broker
from integration.contract_urls import BACKENDS, at_defaults
from msgbus import Message
from msgbus.adapter import Adapter, Endpoint, Receiver, Record
from msgbus.errors import CapabilityMissing, MsgbusError, TopologyError

pytestmark = [  # the Service Bus SDK's leftovers, as in test_contract_servicebus.py
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:unclosed:ResourceWarning"),
]

GONE_WITHIN = 30.0  # seconds a deletion may take to show (Kafka deletes topics in the background)
CANNOT_DELETE = {"servicebus"}  # management=none
HOSTILE = ["*", ">", "a~b", "x/y", "{k}", "q\x00", "' OR '1'='1", "a" * 300, "a\nb", "$SYS"]


async def exists(adapter: Adapter, queue: str) -> bool:
    try:
        await adapter.declare(Endpoint("queue", queue), create=False)
    except TopologyError:
        return False
    return True


async def gone(url: str, queue: str) -> bool:
    """Whether ``queue`` is missing, on a fresh connection (nothing cached), within ``GONE_WITHIN``."""
    deadline = time.monotonic() + GONE_WITHIN
    while True:
        async with msgbus.connect(url) as bus:
            if not await exists(bus.adapter, queue):
                return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.5)


async def kafka_groups_of(url: str, queue: str) -> list[str]:
    """The consumer groups on the broker that name ``queue``, within ``GONE_WITHIN`` (the coordinator drops them
    once the deleted topics' offsets are gone)."""
    deadline = time.monotonic() + GONE_WITHIN
    async with msgbus.connect(url) as bus:
        admin = bus.adapter.admin  # type: ignore[attr-defined]
        while True:
            found = [str(g[0]) for g in await admin.list_consumer_groups() if queue in str(g[0])]
            if not found or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.5)


async def take(receiver: Receiver, n: int, seconds: float = 30.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + seconds
    while len(got) < n and time.monotonic() < deadline:
        got += await receiver.receive(n - len(got), 1.0)
    return got


async def echo(msg: Message[Any]) -> None:
    await msg.reply(msg.body)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_close_deletes_the_reply_queue(broker_url: Callable[[str], Broker], backend: str) -> None:
    url = at_defaults(broker_url(backend))
    service = f"del-svc-{uuid.uuid4().hex[:8]}"
    async with msgbus.connect(url) as responder:
        consumer = responder.consumer(service)
        task = asyncio.create_task(consumer.run(echo))
        try:
            bus = msgbus.connect(url)
            assert (await bus.request(service, {"n": 1}, timeout=60)).body == {"n": 1}
            assert bus._replies is not None
            queue = bus._replies.queue
            assert await exists(responder.adapter, queue)
            started = time.monotonic()
            await bus.close()
            took = time.monotonic() - started
        finally:
            consumer.stop()
            await task
        if backend not in CANNOT_DELETE:
            await responder.adapter.delete(Endpoint("queue", service))
    if backend in CANNOT_DELETE:
        async with msgbus.connect(url) as other:
            assert await exists(other.adapter, queue)
            with pytest.raises(CapabilityMissing):
                await other.adapter.delete(Endpoint("queue", queue))
    else:
        assert await gone(url, queue)
    if backend == "kafka":  # the groups went with the topics' offsets (asked of the broker, not the adapter)
        assert not await kafka_groups_of(url, queue)
    print(f"{backend}: reply queue {queue} {'kept' if backend in CANNOT_DELETE else 'deleted'}; close {took:.2f} s")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in CANNOT_DELETE])
async def test_delete_takes_messages_and_dead_letters_and_spares_the_neighbour(
    broker_url: Callable[[str], Broker], backend: str
) -> None:
    url = at_defaults(broker_url(backend))
    doomed, kept = f"del-{uuid.uuid4().hex[:8]}", f"kept-{uuid.uuid4().hex[:8]}"
    async with msgbus.connect(url) as bus:
        adapter = bus.adapter
        for name in (doomed, kept):
            await adapter.declare(Endpoint("queue", name))
            await adapter.send(
                Endpoint("queue", name), [Record(f"{name}-{i}".encode(), f"{name}-{i}") for i in range(3)]
            )
        receiver = await adapter.receiver(Endpoint("queue", doomed), prefetch=1)
        (first,) = await take(receiver, 1)
        await first.dead_letter("delete test")
        await receiver.close()
        await adapter.delete(Endpoint("queue", doomed))
        await adapter.delete(Endpoint("queue", doomed))  # again: nothing to do, no error
        for name in HOSTILE:  # refused typed, or only a queue of that name (none) deleted
            try:
                await adapter.delete(Endpoint("queue", name))
            except MsgbusError as err:
                print(f"{backend}: delete {name!r:.20}: {type(err).__name__}")
        receiver = await adapter.receiver(Endpoint("queue", kept), prefetch=3)
        got = await take(receiver, 3)
        for delivery in got:
            await delivery.ack()
        await receiver.close()
        assert sorted(d.record.id for d in got) == [f"{kept}-{i}" for i in range(3)]
        await adapter.delete(Endpoint("queue", kept))
    assert await gone(url, doomed)
    assert await gone(url, kept)
