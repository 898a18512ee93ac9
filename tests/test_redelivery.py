"""The delivery limit, redeliveries running alone, and the ack bound, on memory:// (msgbus/_redelivery.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest

import msgbus
from msgbus import _memory
from msgbus._runtime import ACK_BATCH
from msgbus.adapter import Delivery
from msgbus.errors import ConfigError
from msgbus.testing._crash import abandon


def url() -> str:
    return f"memory://redelivery-{uuid.uuid4().hex[:8]}?visibility_timeout=0.2"


async def redeliver(bus: msgbus.Bus, queue: str, times: int) -> None:
    """Deliver everything in ``queue`` ``times`` times to consumers that vanish without settling."""
    for _ in range(times):
        gone = bus.consumer(queue, prefetch=100)
        while not await gone.receive(max_messages=100, timeout=0.5):
            pass
        await abandon(gone)
        await asyncio.sleep(0.25)  # the leases expire


async def run_until(consumer: msgbus.Consumer[Any], handler: Any, done: Callable[[], bool], **options: Any) -> None:
    """``consumer.run(handler, **options)`` until ``done()``, then stop it."""
    task = asyncio.create_task(consumer.run(handler, **options))
    while not done():
        await asyncio.sleep(0.01)
    consumer.stop()
    await task


async def dead_letters(bus: msgbus.Bus, queue: str, n: int) -> list[msgbus.Message[Any]]:
    dlq = bus.dead_letters(queue)
    got: list[msgbus.Message[Any]] = []
    while len(got) < n:
        got += await dlq.receive(max_messages=10, timeout=1.0)
    return got


async def test_run_dead_letters_a_message_over_the_limit_before_any_handler() -> None:
    async with msgbus.connect(url()) as bus:
        msg_id = await bus.producer("q").send(b"poison")
        await redeliver(bus, "q", 3)  # delivered 3 times, never settled: the next delivery is attempt 4
        handled: list[int] = []

        async def handle(msg: msgbus.Message[Any]) -> None:
            handled.append(msg.attempt)

        dead_ones: list[msgbus.Message[Any]] = []

        async def read() -> None:
            dead_ones.extend(await dead_letters(bus, "q", 1))

        reader = asyncio.create_task(read())
        await run_until(bus.consumer("q"), handle, reader.done, retry=msgbus.RetryPolicy(max_attempts=3))
        (dead,) = dead_ones
    assert handled == [] and dead.id == msg_id
    assert dead.dead_letter_reason is not None and dead.dead_letter_reason.startswith("delivered 4 times")
    assert dead.dead_letter_attempts == 4


async def test_receive_applies_the_consumers_retry_policy() -> None:
    async with msgbus.connect(url()) as bus:
        await bus.producer("q").send_many([b"a", b"b"])
        await redeliver(bus, "q", 2)
        consumer = bus.consumer("q", retry=msgbus.RetryPolicy(max_attempts=2))
        got: list[msgbus.Message[Any]] = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            got += await consumer.receive(max_messages=10, timeout=0.1)
        dead = await dead_letters(bus, "q", 2)
        relaxed = bus.consumer("q2", retry=msgbus.RetryPolicy(max_attempts=3))  # another queue: untouched
        assert await relaxed.receive(timeout=0.05) == []
    assert got == [] and {m.payload for m in dead} == {b"a", b"b"}
    assert all(m.dead_letter_attempts == 3 for m in dead)


async def test_a_redelivery_runs_alone_and_the_held_ones_alternate_oldest_and_newest_first() -> None:
    async with msgbus.connect(url()) as bus:
        ids = await bus.producer("q").send_many([{"i": i} for i in range(6)])
        await redeliver(bus, "q", 1)  # all six come back as attempt 2: suspects
        order: list[str] = []
        running = 0
        most = 0

        async def handle(msg: msgbus.Message[Any]) -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            order.append(msg.id)
            await asyncio.sleep(0.01)
            running -= 1

        await run_until(bus.consumer("q"), handle, lambda: len(order) >= 6, concurrency=4)
        assert most == 1 and order == ids  # attempt 2 (even): oldest first, one at a time

        ids = await bus.producer("r").send_many([{"i": i} for i in range(6)])
        await redeliver(bus, "r", 2)  # attempt 3 (odd): newest first
        order.clear()
        await run_until(bus.consumer("r"), handle, lambda: len(order) >= 6, concurrency=4)
        assert most == 1 and order == ids[::-1]


async def test_retries_this_run_nacked_are_not_run_alone() -> None:
    async with msgbus.connect(url()) as bus:
        await bus.producer("q").send_many([{"i": i} for i in range(8)])
        running = most = 0
        done: set[str] = set()

        async def fails_once(msg: msgbus.Message[Any]) -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.05)
            running -= 1
            if msg.attempt == 1:
                raise ValueError("first try")
            done.add(msg.id)

        policy = msgbus.RetryPolicy(initial_backoff=0, jitter=0)
        await run_until(bus.consumer("q"), fails_once, lambda: len(done) >= 8, concurrency=8, retry=policy)
    assert most > 1


async def test_redeliveries_a_handler_nacked_itself_are_not_run_alone() -> None:
    """A handler's own ``nack()`` is this consumer's nack like a failed attempt's: its redelivery is expected,
    not a suspect. Run alone, 300 of them stalled a 3000-message Service Bus run until buffered locks expired."""
    async with msgbus.connect(url()) as bus:
        await bus.producer("q").send_many([{"i": i} for i in range(8)])
        running = most = 0
        done: set[str] = set()

        async def nacks_once(msg: msgbus.Message[Any]) -> None:
            nonlocal running, most
            if msg.attempt == 1:
                await msg.nack()
                return
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.05)
            running -= 1
            done.add(msg.id)

        await run_until(bus.consumer("q"), nacks_once, lambda: len(done) >= 8, concurrency=8)
    assert most > 1  # the redeliveries ran side by side (alone, it would be 1)


async def test_run_refuses_max_attempts_at_the_brokers_own_limit() -> None:
    async with msgbus.connect(url()) as bus:
        bus.adapter.capabilities = replace(bus.capabilities, native_delivery_limit=5)

        async def handle(msg: msgbus.Message[Any]) -> None:
            pass

        with pytest.raises(ConfigError, match="own delivery limit"):
            await bus.consumer("q").run(handle, retry=msgbus.RetryPolicy(max_attempts=5))


async def test_acks_of_a_handler_that_never_awaits_go_out_while_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, int]] = []  # (batch size, handlers run when it was sent)
    handled = 0
    real = _memory._MemoryReceiver.ack_many

    async def recording(self: Any, deliveries: Sequence[Delivery]) -> None:
        sent.append((len(deliveries), handled))
        await real(self, deliveries)

    monkeypatch.setattr(_memory._MemoryReceiver, "ack_many", recording)
    async with msgbus.connect(url()) as bus:
        await bus.producer("q").send_many([{"i": i} for i in range(300)])

        async def spin(msg: msgbus.Message[Any]) -> None:
            nonlocal handled
            end = time.monotonic() + 0.001
            while time.monotonic() < end:
                pass
            handled += 1

        await run_until(bus.consumer("q", prefetch=300), spin, lambda: handled >= 300)
    assert sum(size for size, _ in sent) == 300
    assert max(size for size, _ in sent) <= ACK_BATCH
    assert sent[0][1] < 300  # acks went out while the 300 buffered messages were still being handled
