"""What the adapters' backstop tests share: drive a message past the broker's own delivery limit."""

from __future__ import annotations

import secrets
from typing import Any

import msgbus

from .brokers import endpoint


async def past_the_brokers_limit(backend: str, options: str, limit: int) -> tuple[list[int], list[msgbus.Message[Any]]]:
    """Send one message to a fresh queue on ``backend`` and release it unsettled ``limit`` times, as consumers
    that died would; returns the attempts it was delivered as and its dead-letter queue's copy (the only one).

    msgbus's own limit is kept out of the way (the consumer's ``max_attempts`` is far above ``limit``), so only
    the broker's may fire. Fails unless the bus declares ``limit`` as its ``native_delivery_limit``.
    """
    url = endpoint(backend).url
    if options:
        url += ("&" if "?" in url else "?") + options
    async with msgbus.connect(url) as bus:
        assert bus.capabilities.native_delivery_limit == limit
        queue = f"backstop-{secrets.token_hex(4)}"
        sent = await bus.producer(queue).send({"poison": True})
        consumer = bus.consumer(queue, retry=msgbus.RetryPolicy(max_attempts=limit + 10))
        attempts: list[int] = []
        for _ in range(limit):
            got: list[msgbus.Message[Any]] = []
            while not got:
                got = await consumer.receive(timeout=5.0)
            attempts.append(got[0].attempt)
            await got[0].nack()
        assert await consumer.receive(timeout=3.0) == []  # where the broker moves it on the next receive
        await consumer.close()
        dead: list[msgbus.Message[Any]] = []
        dlq = bus.dead_letters(queue)
        for _ in range(20):
            dead += await dlq.receive(timeout=1.0)
            if dead:
                break
        await dlq.close()
    assert [m.id for m in dead] == [sent], f"{backend}: the dead-letter queue holds {dead} after attempts {attempts}"
    return attempts, dead
