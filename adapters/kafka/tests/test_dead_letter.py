"""A dead-letter produce that fails leaves the record unsettled and redelivered, not stuck in its partition."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest

import msgbus
from integration.brokers import endpoint
from msgbus.adapter import Endpoint, Record
from msgbus.errors import PublishError

pytestmark = pytest.mark.integration


async def _receive(consumer: msgbus.Consumer[Any], seconds: float) -> list[msgbus.Message[Any]]:
    got: list[msgbus.Message[Any]] = []
    for _ in range(int(seconds / 0.5)):
        got += await consumer.receive(10, timeout=0.5)
        if got:
            break
    return got


async def test_a_failed_dead_letter_produce_redelivers_the_record_and_its_key_moves_on() -> None:
    """Before: the record stayed delivered (never redelivered), and every later record of its key, and the
    partition's committed offset, waited behind it until a rebalance."""
    url = f"{endpoint('kafka').url}?partitions=1"
    queue = f"dlfail-{uuid.uuid4().hex[:10]}"
    async with msgbus.connect(url) as bus:
        first, second = await bus.producer(queue).send_many([b"first", b"second"], key="k")
        adapter = bus.adapter
        real_send = adapter.send
        failures = [PublishError("dead-letter topic unreachable (injected once)")]

        async def send_failing_once(target: Endpoint, records: Sequence[Record], delay: float | None = None) -> None:
            if target.dead_letter and failures:
                raise failures.pop()
            await real_send(target, records, delay)

        adapter.send = send_failing_once  # type: ignore[method-assign]
        consumer = bus.consumer(queue, prefetch=10)
        (msg,) = await _receive(consumer, 10)
        assert (msg.id, msg.attempt) == (first, 1)
        with pytest.raises(PublishError):
            await msg.reject("bad order")
        (again,) = await _receive(consumer, 10)
        assert (again.id, again.attempt) == (first, 2), "the record whose dead-letter failed must come back first"
        await again.reject("bad order")
        (nxt,) = await _receive(consumer, 10)
        assert nxt.id == second, "its key moves on once it is dead-lettered"
        await nxt.ack()
        dead = await _receive(bus.dead_letters(queue), 10)
        assert [(d.id, d.dead_letter_reason, d.dead_letter_attempts) for d in dead] == [(first, "bad order", 2)]
        for d in dead:
            await d.ack()
        await consumer.close()
        assert await _receive(bus.consumer(queue), 2) == [], "both settled and committed: nothing comes back"
