"""The prefetch limit is the core's alone: the consumer's inbox asks a receiver for at most the room it has left.

The memory and SQLite receivers count nothing themselves (no adapter does since the core owns the limit), so
what these tests see is the core's count; each is also run with the core's limit broken, and must fail then.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import msgbus
from msgbus import Message
from msgbus._inbox import Inbox


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/bus.db"


@pytest.fixture
def broken_limit() -> Iterator[None]:
    """The core asking for one more whatever it holds (the rule before the limit was the core's alone)."""
    real = Inbox.room

    async def at_least_one(self: Inbox[Any], wanted: int, timeout: float) -> tuple[int, float]:
        assert self.prefetch is not None
        return max(1, min(wanted, self.prefetch - self.unsettled)), timeout

    Inbox.room = at_least_one  # type: ignore[method-assign]
    try:
        yield
    finally:
        Inbox.room = real  # type: ignore[method-assign]


async def _receive_held(url: str) -> tuple[list[int], int]:
    """Batch sizes of receive(10) while holding everything received with prefetch 5 (acking 2 after the
    second call), and how many distinct messages were received in the end (20 sent)."""
    sizes: list[int] = []
    async with msgbus.connect(url) as bus:
        await bus.producer("jobs").send_many(list(range(20)))
        async with bus.consumer("jobs", prefetch=5) as consumer:
            held = await consumer.receive(10, 2.0)
            sizes.append(len(held))
            more = await consumer.receive(10, 0.2)  # holding 5: the core asks for nothing
            sizes.append(len(more))
            held += more
            for msg in held[:2]:
                await msg.ack()
            freed = await consumer.receive(10, 2.0)  # two settled: room for exactly two
            sizes.append(len(freed))
            got = [m.body for m in held + freed]
            for msg in held[2:] + freed:
                await msg.ack()
            while batch := await consumer.receive(10, 0.5):
                got += [m.body for m in batch]
                for msg in batch:
                    await msg.ack()
    counts = Counter(got)
    assert all(n == 1 for n in counts.values()), f"duplicates: {[b for b, n in counts.items() if n > 1]}"
    return sizes, len(counts)


async def test_receive_never_holds_more_than_prefetch(url: str) -> None:
    sizes, distinct = await _receive_held(url)
    assert sizes == [5, 0, 2]
    assert distinct == 20  # 20 sent, 20 received, 0 lost, 0 duplicated


@pytest.mark.usefixtures("broken_limit")
async def test_receive_check_catches_a_core_that_asks_past_prefetch() -> None:
    sizes, _ = await _receive_held("memory://")
    assert sizes[1] > 0  # the broken core held a sixth message with prefetch 5


async def _most_at_once(url: str, prefetch: int, concurrency: int, n: int) -> tuple[int, int]:
    """run() with more workers than ``prefetch``: the most messages in handlers at once, and how many were
    handled (each exactly once)."""
    handled: Counter[int] = Counter()
    now = most = 0
    done = asyncio.Event()

    async def handle(msg: Message[Any]) -> None:
        nonlocal now, most
        now += 1
        most = max(most, now)
        await asyncio.sleep(0.002)
        now -= 1
        handled[msg.body] += 1
        if len(handled) == n:
            done.set()

    async with msgbus.connect(url) as bus:
        await bus.producer("jobs").send_many(list(range(n)))
        consumer = bus.consumer("jobs", prefetch=prefetch)
        task = asyncio.create_task(consumer.run(handle, concurrency=concurrency))
        async with asyncio.timeout(30):
            await done.wait()
        consumer.stop()
        await task
    assert all(c == 1 for c in handled.values()), f"handled twice: {[b for b, c in handled.items() if c > 1]}"
    return most, len(handled)


async def test_run_holds_at_most_prefetch_whatever_its_concurrency(url: str) -> None:
    most, handled = await _most_at_once(url, prefetch=3, concurrency=16, n=60)
    assert handled == 60
    assert 1 <= most <= 3


@pytest.mark.usefixtures("broken_limit")
async def test_run_check_catches_a_core_that_asks_past_prefetch() -> None:
    most, _ = await _most_at_once("memory://", prefetch=3, concurrency=16, n=60)
    assert most > 3
