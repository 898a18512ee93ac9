"""Consumer-group rebalances on real Kafka: consumers join and leave mid-stream, nothing is lost.

Four consumers on separate buses come and go while 2000 keyed messages are produced in bursts. Every
message must be processed; duplicates are counted and reported (a graceful leave commits what it settled
and the notes it leaves let the next owner skip it, so a clean churn should cause none); per key, a
message is never processed before an earlier one of the same key.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import pytest

import msgbus
from integration.brokers import endpoint

N, KEYS, BURST = 2000, 40, 250
OPTIONS = "partitions=8&visibility_timeout=2&session_timeout=3&heartbeat_interval=0.3&rebalance_timeout=20"


async def test_consumers_join_and_leave_mid_stream(record_property: pytest.RecordProperty) -> None:
    url = f"{endpoint('kafka').url}?{OPTIONS}"
    queue = f"rebalance-{uuid.uuid4().hex[:10]}"
    handled: Counter[str] = Counter()
    per_consumer: Counter[str] = Counter()
    next_i: dict[str, int] = {}
    violations: list[str] = []
    progress = asyncio.Event()

    def handler(name: str) -> Any:
        async def handle(msg: msgbus.Message[Any]) -> None:
            key, i = msg.body["k"], msg.body["i"]
            if i < next_i.get(key, 0) and handled[msg.id] == 0:
                violations.append(f"{key}#{i} after #{next_i[key] - 1}")
            await asyncio.sleep(0.002)
            next_i[key] = max(next_i.get(key, 0), i + 1)
            handled[msg.id] += 1
            per_consumer[name] += 1
            progress.set()

        return handle

    buses: list[msgbus.Bus] = []
    running: dict[str, tuple[msgbus.Consumer[Any], asyncio.Task[None]]] = {}

    async def join(name: str) -> None:
        bus = msgbus.connect(url)
        await bus.open()
        buses.append(bus)
        consumer = bus.consumer(queue)
        await consumer.open()
        running[name] = (consumer, asyncio.create_task(consumer.run(handler(name), concurrency=4)))

    async def leave(name: str) -> None:
        consumer, task = running.pop(name)
        consumer.stop()
        await task
        await consumer.close()

    async def wait_for(count: int) -> None:
        while len(handled) < count:
            progress.clear()
            await asyncio.wait_for(progress.wait(), 60)

    sender = msgbus.connect(url)
    await sender.open()
    buses.append(sender)
    producer = sender.producer(queue)
    sent: list[str] = []

    async def burst() -> None:
        start = len(sent)
        items = [
            msgbus.Outgoing({"k": f"k{i % KEYS}", "i": i}, key=f"k{i % KEYS}") for i in range(start, start + BURST)
        ]
        sent.extend(await producer.send_many(items))

    try:
        await join("a")
        await burst()
        await wait_for(BURST // 2)
        await join("b")  # joins mid-burst
        await burst()
        await join("c")
        await burst()
        await wait_for(2 * BURST)
        await leave("a")  # leaves with work in flight
        await burst()
        await join("d")
        await burst()
        await leave("b")
        await burst()
        await wait_for(5 * BURST)
        await join("e")
        await burst()
        await leave("c")
        await burst()
        await wait_for(N)
        await asyncio.sleep(1.0)  # anything redelivered late shows up as a duplicate
        for name in list(running):
            await leave(name)
    finally:
        for _consumer, task in running.values():
            task.cancel()
        for bus in buses:
            await bus.close()

    lost = set(sent) - set(handled)
    dups = sum(handled.values()) - len(handled)
    summary = (
        f"{len(sent)} sent, {len(handled)} processed, {len(lost)} lost, {dups} dup; per consumer {dict(per_consumer)}"
    )
    record_property("kafka_rebalance", summary)
    print(summary)
    assert len(sent) == N
    assert not lost, summary
    assert set(handled) == set(sent), summary
    assert not violations, f"{len(violations)} per-key order violations, e.g. {violations[:3]}; {summary}"
    assert dups == 0, summary


async def test_records_fetched_while_the_assignment_loads_are_kept() -> None:
    """aiokafka fetches for a new assignment before ``on_partitions_assigned`` returns; records arriving
    while the receiver still loads the previous owner's notes must be kept, not dropped (they would never
    be fetched again: a silent loss). The notes are made slow here so that window is wide and certain."""
    url = f"{endpoint('kafka').url}?{OPTIONS}"
    queue = f"assign-{uuid.uuid4().hex[:10]}"
    n = 400
    async with msgbus.connect(url) as bus:
        sent = set(await bus.producer(queue).send_many([{"i": i} for i in range(n)]))
        admin = bus._adapter.admin  # type: ignore[attr-defined]
        notes = admin.list_consumer_group_offsets

        async def slow_notes(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(2.0)  # several fetches complete meanwhile
            return await notes(*args, **kwargs)

        admin.list_consumer_group_offsets = slow_notes
        got: Counter[str] = Counter()
        done = asyncio.Event()

        async def handle(msg: msgbus.Message[Any]) -> None:
            got[msg.id] += 1
            if len(got) >= n:
                done.set()

        consumer = bus.consumer(queue)
        task = asyncio.create_task(consumer.run(handle, concurrency=4))
        try:
            await asyncio.wait_for(done.wait(), 60)
        except TimeoutError:
            pass
        consumer.stop()
        await task
    lost = sent - set(got)
    assert not lost, f"{n} sent, {len(got)} received, {len(lost)} lost (fetched during the assignment, dropped)"
    assert set(got) == sent
