"""``send_many`` hands Kafka whole record batches: each key lands where a single send puts it, in order."""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

import pytest

import msgbus
from integration.brokers import endpoint

pytestmark = pytest.mark.integration

KEYS, PER_KEY, UNKEYED = 10, 30, 40


async def test_send_many_keeps_keys_on_their_partition_in_order() -> None:
    url = f"{endpoint('kafka').url}?partitions=8"
    queue = f"batches-{uuid.uuid4().hex[:10]}"
    async with msgbus.connect(url) as bus:
        producer = bus.producer(queue)
        consumer = bus.consumer(queue, prefetch=500)
        await consumer.open()
        keyed = [msgbus.Outgoing({"k": f"k{i % KEYS}", "i": i}, key=f"k{i % KEYS}") for i in range(KEYS * PER_KEY)]
        await producer.send_many(keyed + [msgbus.Outgoing({"k": None, "i": i}) for i in range(UNKEYED)])
        for k in range(KEYS):  # one single send per key, after its batch: same partition, last in order
            await producer.send({"k": f"k{k}", "i": 10_000}, key=f"k{k}")
        total = KEYS * PER_KEY + UNKEYED + KEYS
        got: list[msgbus.Message[Any]] = []
        for _ in range(200):
            if len(got) >= total:
                break
            batch = await consumer.receive(500, 1.0)
            for msg in batch:
                await msg.ack()
            got += batch
    assert len(got) == total and len({m.id for m in got}) == total  # 360 sent, 360 received, 0 lost, 0 dup
    partitions: dict[str | None, set[int]] = defaultdict(set)
    order: dict[str | None, list[int]] = defaultdict(list)
    for msg in got:
        partitions[msg.body["k"]].add(msg._delivery.raw.partition)
        order[msg.body["k"]].append(msg.body["i"])
    assert all(len(p) == 1 for p in partitions.values()), partitions  # unkeyed ones too: one partition per call
    assert len({p for k, ps in partitions.items() if k is not None for p in ps}) > 1  # keys do spread
    for key, seen in order.items():
        assert seen == sorted(seen), f"{key} out of order"
