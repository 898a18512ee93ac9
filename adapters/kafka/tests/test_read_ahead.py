"""The receiver fetches ahead and notes the next attempt of what it fetched before ``receive`` asks for it;
a graceful close writes exact counts, so records that were only read ahead come back as first attempts."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

import msgbus
from integration.brokers import endpoint
from msgbus_kafka import _codec

pytestmark = pytest.mark.integration

N, PREFETCH = 100, 10


async def _notes(bus: msgbus.Bus, group: str) -> _codec.PartitionNotes:
    offsets = await bus._adapter.admin.list_consumer_group_offsets(group)  # type: ignore[attr-defined]
    (meta,) = offsets.values()  # one partition
    return _codec.decode_notes(meta.metadata)


async def test_read_ahead_is_noted_and_a_graceful_close_leaves_exact_counts() -> None:
    url = f"{endpoint('kafka').url}?partitions=1"
    queue = f"ahead-{uuid.uuid4().hex[:10]}"
    async with msgbus.connect(url) as bus:
        sent = await bus.producer(queue).send_many([{"i": i} for i in range(N)])
        consumer = bus.consumer(queue, prefetch=PREFETCH)
        first: list[msgbus.Message[Any]] = []
        while len(first) < PREFETCH:
            first += await consumer.receive(PREFETCH - len(first), timeout=5.0)
        assert [m.body["i"] for m in first] == list(range(PREFETCH))
        group = consumer._receiver.group  # type: ignore[union-attr]

        # Records beyond the ten handed out are fetched and noted as attempt 1 already, at most three credits.
        for _ in range(100):
            noted = (await _notes(bus, group)).attempts
            if len(noted) > PREFETCH:
                break
            await asyncio.sleep(0.05)
        assert len(noted) > PREFETCH, noted
        assert set(noted) <= set(range(4 * PREFETCH)) and set(noted.values()) == {1}, noted

        for msg in first[:5]:
            await msg.ack()
        await consumer.close()  # five acked, five held: a graceful hand-over

        notes = await _notes(bus, group)
        assert dict(notes.attempts) == {i: 1 for i in range(5, PREFETCH)}, notes  # exact: no read-ahead claims

        again = bus.consumer(queue, prefetch=50)
        got: dict[str, msgbus.Message[Any]] = {}
        while len(got) < N - 5:
            for msg in await again.receive(50, timeout=5.0):
                assert msg.id not in got, f"{msg.id} delivered twice"
                got[msg.id] = msg
                await msg.ack()
        await again.close()
    assert set(got) == set(sent[5:])  # 95 left, 95 received, 0 lost, 0 dup
    attempts = {m.body["i"]: m.attempt for m in got.values()}
    assert {i for i, a in attempts.items() if a == 2} == set(range(5, PREFETCH))
    assert {i for i, a in attempts.items() if a == 1} == set(range(PREFETCH, N))
