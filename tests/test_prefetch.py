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


@pytest.fixture
def small_byte_bound(monkeypatch: pytest.MonkeyPatch) -> int:
    """``PREFETCH_BYTES`` at 10,000, so 1,000-byte bodies reach it at 10 held, long before a prefetch of 512."""
    monkeypatch.setattr("msgbus._inbox.PREFETCH_BYTES", 10_000)
    return 10_000


@pytest.fixture
def count_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The core bounding what it holds by count alone (the rule before the byte bound)."""

    def by_count(self: Inbox[Any]) -> int:
        assert self.prefetch is not None
        return self.prefetch - self.unsettled

    monkeypatch.setattr(Inbox, "_free", by_count)


async def _receive_by_bytes(url: str) -> tuple[list[int], int]:
    """Batch sizes of receive(100) on 40 bodies of 1,000 bytes and one of 50,000 with prefetch 512, holding
    one received first (so the size is known): what the bytes allow, then none, and again after acking all;
    the large one alone. Returns the sizes and how many distinct messages were received (41 sent)."""
    sizes: list[int] = []
    got: list[bytes] = []
    async with msgbus.connect(url) as bus:
        producer = bus.producer("big")
        await producer.send_many([i.to_bytes(2, "big") * 500 for i in range(40)])
        await producer.send(b"L" * 50_000)
        async with bus.consumer("big", prefetch=512) as consumer:
            held = await consumer.receive(1, 1.0)
            for _ in range(8):
                held += await consumer.receive(100, 1.0)
                sizes.append(len(held) - (1 if len(sizes) == 0 else 0))
                more = await consumer.receive(100, 0.2)  # holding: nothing more while the bytes are taken
                sizes.append(len(more))
                for msg in held + more:
                    got.append(msg.body)
                    await msg.ack()
                held = []
                if len(got) == 41:
                    break
    counts = Counter(got)
    assert all(n == 1 for n in counts.values()), "duplicates"
    return sizes, len(counts)


async def test_receive_holds_at_most_prefetch_bytes(url: str, small_byte_bound: int) -> None:
    sizes, distinct = await _receive_by_bytes(url)
    # 9 beside the one held, then 10 x 1,000 bytes; the 50,000-byte message alone (more than the bound)
    assert sizes[:6] == [9, 0, 10, 0, 10, 0]
    assert max(sizes[6:]) <= 10
    assert distinct == 41  # 41 sent, 41 received, 0 lost, 0 duplicated


@pytest.mark.usefixtures("small_byte_bound", "count_only")
async def test_bytes_check_catches_a_core_that_counts_only() -> None:
    sizes, _ = await _receive_by_bytes("memory://")
    assert sizes[0] > 9


async def test_run_defaults_to_the_adapters_credit() -> None:
    """run() with no prefetch takes the adapter's natural credit, or two per worker when that is more; a
    prefetch the user set wins."""
    seen: dict[str, int | None] = {}

    async def once(bus: msgbus.Bus, name: str, concurrency: int, prefetch: int | None = None) -> None:
        await bus.producer(name).send(b"x")
        consumer = bus.consumer(name, prefetch=prefetch)

        async def handle(msg: Message[Any]) -> None:
            seen[name] = consumer._inbox.prefetch
            consumer.stop()

        await consumer.run(handle, concurrency=concurrency)
        await consumer.close()

    async with msgbus.connect("memory://") as bus:
        bus.adapter.credit = 100
        await once(bus, "few", 2)
        await once(bus, "many", 80)
        await once(bus, "set", 80, prefetch=7)
    assert seen == {"few": 100, "many": 160, "set": 7}


async def test_default_credit_is_bounded_by_a_short_lock() -> None:
    """Behind a 2 s lock the default credit holds at most 20 per second of it (40), or the workers' share."""
    seen: list[int | None] = []
    async with msgbus.connect("memory://?visibility_timeout=2") as bus:
        bus.adapter.credit = 512
        for name, concurrency in (("short", 4), ("wide", 64)):
            await bus.producer(name).send(b"x")
            consumer = bus.consumer(name)

            async def handle(msg: Message[Any], consumer: msgbus.Consumer[Any] = consumer) -> None:
                seen.append(consumer._inbox.prefetch)
                consumer.stop()

            await consumer.run(handle, concurrency=concurrency)
            await consumer.close()
    assert seen == [40, 128]
