"""A graceful stop hands its unstarted buffer back with AMQP ``released``, which counts no delivery: the next
consumer gets each message at the attempt it had. An abandon would count one, so a message handed back by every
restart of a service would reach the delivery limit unhandled, and the consumer taking it over would run it alone
as a suspect (``msgbus._redelivery``), one at a time. Needs the local broker."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest

import msgbus

pytestmark = [pytest.mark.integration]


async def test_a_stopped_consumers_buffer_comes_back_uncounted() -> None:
    from integration.brokers import endpoint

    async with msgbus.connect(endpoint("servicebus").url) as bus:
        queue = f"stop-release-{secrets.token_hex(4)}"
        sent = set(await bus.producer(queue).send_many([{"i": i} for i in range(40)]))
        handled: list[str] = []

        async def slow(msg: msgbus.Message[Any]) -> None:
            handled.append(msg.id)
            await asyncio.sleep(0.05)

        holder = bus.consumer(queue, prefetch=20)
        task = asyncio.create_task(holder.run(slow, concurrency=1))
        async with asyncio.timeout(20):
            while len(handled) < 3:
                await asyncio.sleep(0.01)
        holder.stop()
        await task  # no close(): the holder stays open, its buffer handed back
        other = bus.consumer(queue)
        got: dict[str, int] = {}
        async with asyncio.timeout(20):
            while set(got) | set(handled) != sent:
                for msg in await other.receive(max_messages=20, timeout=1.0):
                    assert msg.id not in got, f"{msg.id} received twice"
                    got[msg.id] = msg.attempt
                    await msg.ack()
        await other.close()
        await holder.close()
    assert not set(got) & set(handled), "handled by both"
    assert len(got) + len(handled) == len(sent) == 40
    counted = {i: a for i, a in got.items() if a != 1}
    assert not counted, f"{len(counted)} of the {len(got)} handed back came back counted: {sorted(counted.values())}"
