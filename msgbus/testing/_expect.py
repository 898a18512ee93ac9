"""Waiting for messages in a user's tests: receive with a total deadline, and say what arrived when it runs out.

Plain ``async`` functions raising ``AssertionError`` (pytest shows the message as is); no pytest import.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .._bus import Bus, Consumer
from .._message import Message
from ..adapter import HEADER_DEAD_LETTER_REASON

__all__ = ["assert_dead_lettered", "assert_received", "assert_sent", "wait_for_messages"]


async def wait_for_messages(consumer: Consumer[Any], count: int, *, timeout: float = 5.0) -> list[Message[Any]]:
    """Receive and ack exactly ``count`` messages from ``consumer`` within ``timeout`` seconds in total.

    Raises ``AssertionError`` naming the queue, the count and the bodies that did arrive when the time runs
    out; those are acked all the same (the test failed; a redelivery would only confuse the next one).
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this loop
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count!r}")
    got: list[Message[Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        batch = await consumer.receive(max_messages=count - len(got), timeout=min(remaining, 1.0))
        for msg in batch:
            await msg.ack()
        got.extend(batch)
    if len(got) < count:
        bodies = [m.body for m in got]
        raise AssertionError(
            f"waited {timeout:g} s for {count} message(s) from {consumer!r}, got {len(got)}: {bodies!r}"
        )
    return got


async def assert_received(consumer: Consumer[Any], bodies: Sequence[Any], *, timeout: float = 5.0) -> None:
    """Wait for ``len(bodies)`` messages and check their decoded bodies equal ``bodies`` in any order."""
    __tracebackhide__ = True
    got = [m.body for m in await wait_for_messages(consumer, len(bodies), timeout=timeout)]
    missing = list(bodies)
    unexpected = []
    for body in got:
        if body in missing:
            missing.remove(body)
        else:
            unexpected.append(body)
    if missing or unexpected:
        raise AssertionError(
            f"{consumer!r}: expected {list(bodies)!r} (any order), got {got!r}; "
            f"missing {missing!r}, unexpected {unexpected!r}"
        )


async def assert_sent(bus: Bus, queue: str, bodies: Sequence[Any], *, timeout: float = 5.0) -> None:
    """Check that ``queue`` holds messages with ``bodies`` (any order): it consumes and acks them.

    For a topic, open a subscriber before the code under test publishes and use ``assert_received``.
    """
    __tracebackhide__ = True
    async with bus.consumer(queue) as consumer:
        await assert_received(consumer, bodies, timeout=timeout)


async def assert_dead_lettered(
    bus: Bus,
    queue: str,
    *,
    subscription: str | None = None,
    count: int = 1,
    reason: str | None = None,
    timeout: float = 5.0,
) -> list[Message[Any]]:
    """Wait for ``count`` dead letters of ``queue`` (or of a topic's ``subscription``), consume them and
    return them; with ``reason``, each one's dead-letter reason must contain it."""
    __tracebackhide__ = True
    async with bus.dead_letters(queue, subscription=subscription) as dlq:
        dead = await wait_for_messages(dlq, count, timeout=timeout)
    if reason is not None:
        reasons = [m.headers.get(HEADER_DEAD_LETTER_REASON, "") for m in dead]
        wrong = [r for r in reasons if reason not in r]
        if wrong:
            raise AssertionError(f"dead letters of {queue!r}: expected reasons containing {reason!r}, got {reasons!r}")
    return dead
