"""``run_batch`` on memory://: typed errors for bad sizes and results, stop and shutdown, locks of waiting messages,
redeliveries running alone (msgbus/_batch.py, the batch path of msgbus/_runtime.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

import msgbus
from msgbus import BatchHandler, BatchResult, Message, RetryPolicy
from msgbus.errors import ConfigError
from msgbus.testing._crash import abandon

FAST = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.02)


def url(lease: float = 1.0) -> str:
    return f"memory://batch-{uuid.uuid4().hex[:8]}?visibility_timeout={lease}"


async def until(done: Callable[[], bool]) -> None:
    while not done():
        await asyncio.sleep(0.01)


async def dead_reasons(bus: msgbus.Bus, queue: str, n: int) -> dict[str, str]:
    """The dead-letter reason of each of ``n`` dead letters of ``queue``, by id."""
    out: dict[str, str] = {}
    async with bus.dead_letters(queue) as dlq:
        while len(out) < n:
            for msg in await dlq.receive(max_messages=n, timeout=1.0):
                out[msg.id] = msg.dead_letter_reason or ""
                await msg.ack()
    return out


async def rest(bus: msgbus.Bus, queue: str) -> set[str]:
    """The ids of what ``queue`` holds, received (and acked) until a receive finds nothing."""
    out: set[str] = set()
    async with bus.consumer(queue, prefetch=100) as again:
        while got := await again.receive(max_messages=100, timeout=0.3):
            out |= {m.id for m in got}
            for m in got:
                await m.ack()
    return out


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"max_batch": 0}, "max_batch must be an int from 1"),
        ({"max_batch": -3}, "max_batch must be an int from 1"),
        ({"max_batch": True}, "max_batch must be an int from 1"),
        ({"max_batch": 2.0}, "max_batch must be an int from 1"),
        ({"max_batch": 10_001}, "max_batch must be an int from 1"),
        ({"max_wait": -0.1}, "max_wait must be a finite number of seconds >= 0"),
        ({"max_wait": float("nan")}, "max_wait must be a finite number of seconds >= 0"),
        ({"max_wait": float("inf")}, "max_wait must be a finite number of seconds >= 0"),
        ({"max_wait": "1"}, "max_wait must be a finite number of seconds >= 0"),
        ({"concurrency": 0}, "concurrency must be an int from 1"),
        ({"retry": 3}, "retry must be a msgbus.RetryPolicy"),
        ({"middleware": [1]}, "run_batch() needs an async handler function and middleware callables"),
    ],
)
async def test_bad_options_raise_config_error(options: dict[str, Any], text: str) -> None:
    async def handler(msgs: list[Message[Any]]) -> None:
        raise AssertionError("never called")

    async with msgbus.connect(url()) as bus:
        with pytest.raises(ConfigError) as err:
            await bus.consumer("q").run_batch(handler, **options)
        assert text in str(err.value)
        assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        ("ok", "a batch handler returns None or a msgbus.BatchResult, not str"),
        (BatchResult({"not a message": RuntimeError()}), "which is not in this batch"),  # type: ignore[dict-item]
    ],
)
async def test_malformed_result_fails_the_batch(result: object, reason: str) -> None:
    """A handler returning something else than None or a BatchResult of its own messages fails them all: retried,
    then dead-lettered with the TypeError that says why. Nothing is acked by mistake."""
    async with msgbus.connect(url()) as bus:
        sent = set(await bus.producer("q").send_many([{"i": i} for i in range(5)]))
        calls: list[int] = []

        async def handler(msgs: list[Message[Any]]) -> Any:
            calls.append(len(msgs))
            return result

        consumer = bus.consumer("q")
        task = asyncio.create_task(consumer.run_batch(handler, max_batch=5, max_wait=0.2, retry=FAST))
        reasons = await dead_reasons(bus, "q", 5)
        consumer.stop()
        await task
        assert set(reasons) == sent
        assert all("TypeError" in r and reason in r for r in reasons.values()), reasons
        assert sum(calls) == 10  # each message twice (max_attempts=2)


async def test_failed_value_must_be_an_exception() -> None:
    async with msgbus.connect(url()) as bus:
        await bus.producer("q").send({"i": 1})
        seen: list[int] = []

        async def handler(msgs: list[Message[Any]]) -> BatchResult:
            seen.append(msgs[0].attempt)
            return BatchResult({msgs[0]: "bad"})  # type: ignore[dict-item]

        consumer = bus.consumer("q")
        task = asyncio.create_task(consumer.run_batch(handler, max_wait=0, retry=FAST))
        (reason,) = (await dead_reasons(bus, "q", 1)).values()
        consumer.stop()
        await task
        assert "to a str, not an exception" in reason
        assert seen == [1, 2]


async def test_middleware_wraps_the_batch_handler() -> None:
    async with msgbus.connect(url()) as bus:
        await bus.producer("q").send_many([{"i": i} for i in range(3)])
        order: list[str] = []

        def outer(h: BatchHandler) -> BatchHandler:
            async def wrapped(msgs: list[Message[Any]]) -> BatchResult | None:
                order.append(f"outer {len(msgs)}")
                return await h(msgs)

            return wrapped

        async def handler(msgs: list[Message[Any]]) -> None:
            order.append("handler")

        consumer = bus.consumer("q")
        task = asyncio.create_task(consumer.run_batch(handler, max_batch=3, max_wait=1, middleware=[outer]))
        await until(lambda: "handler" in order)
        consumer.stop()
        await task
        assert order == ["outer 3", "handler"]


async def test_stop_lets_the_batch_in_flight_finish() -> None:
    """stop() while a batch is in its handler: the batch finishes and is acked, the rest comes back untouched."""
    async with msgbus.connect(url()) as bus:
        sent = set(await bus.producer("q").send_many([{"i": i} for i in range(50)]))
        started, handled = asyncio.Event(), set[str]()

        async def handler(msgs: list[Message[Any]]) -> None:
            started.set()
            await asyncio.sleep(0.2)
            handled.update(m.id for m in msgs)

        consumer = bus.consumer("q")
        task = asyncio.create_task(consumer.run_batch(handler, max_batch=10, max_wait=0.5))
        await started.wait()
        consumer.stop()
        await task
        assert len(handled) == 10
        assert await rest(bus, "q") == sent - handled


async def test_shutdown_timeout_nacks_the_whole_batch() -> None:
    """A batch still running at shutdown_timeout is cancelled, and all its messages come back: none lost, none
    acked."""
    async with msgbus.connect(url()) as bus:
        sent = set(await bus.producer("q").send_many([{"i": i} for i in range(8)]))
        started = asyncio.Event()

        async def handler(msgs: list[Message[Any]]) -> None:
            started.set()
            await asyncio.sleep(60)

        consumer = bus.consumer("q")
        task = asyncio.create_task(consumer.run_batch(handler, max_batch=8, max_wait=0.5, shutdown_timeout=0.1))
        await started.wait()
        consumer.stop()
        await task
        assert await rest(bus, "q") == sent


async def test_messages_waiting_in_a_batch_keep_their_lock() -> None:
    """max_wait longer than the lease: messages gathered into a batch wait past their lease, which is extended, so
    each is handed over once, on its first delivery."""
    async with msgbus.connect(url(lease=0.3)) as bus:
        producer = bus.producer("q")
        got: list[tuple[str, int]] = []

        async def handler(msgs: list[Message[Any]]) -> None:
            got.extend((m.id, m.attempt) for m in msgs)

        consumer = bus.consumer("q")
        task = asyncio.create_task(consumer.run_batch(handler, max_batch=3, max_wait=5))
        early = await producer.send_many([{"i": 1}, {"i": 2}])
        await asyncio.sleep(1.0)  # three leases
        late = await producer.send({"i": 3})
        await until(lambda: len(got) >= 3)
        await asyncio.sleep(0.1)
        consumer.stop()
        await task
        assert got == [(early[0], 1), (early[1], 1), (late, 1)]


async def test_a_suspect_redelivery_runs_alone() -> None:
    """A message that came back without this consumer nacking it (its consumer died) while a batch is gathered is
    not added to it: it is handed over in a batch of its own, as run() runs it alone, so if it kills the process
    nothing handled with it is lost."""
    async with msgbus.connect(url(lease=0.3)) as bus:
        producer = bus.producer("q")
        suspect = await producer.send({"i": 0})
        gone = bus.consumer("q")
        assert await gone.receive(timeout=1.0)
        await abandon(gone)  # its lease expires while the batch below is gathered
        batches: list[list[str]] = []

        async def handler(msgs: list[Message[Any]]) -> None:
            batches.append([m.id for m in msgs])

        consumer = bus.consumer("q")
        task = asyncio.create_task(consumer.run_batch(handler, max_batch=10, max_wait=0.8))
        fresh = await producer.send({"i": 1})
        await until(lambda: sum(map(len, batches)) >= 2)
        consumer.stop()
        await task
        assert batches == [[fresh], [suspect]]


async def test_a_subscriber_runs_batches() -> None:
    """The subscriber's run_batch is the consumer's: every published message once, in batches of at most max_batch."""
    async with msgbus.connect(url()) as bus:
        sub = bus.subscriber("t", subscription="s")
        await sub.open()
        sent = set(await bus.publisher("t").publish_many([{"i": i} for i in range(25)]))
        batches: list[list[str]] = []

        async def handler(msgs: list[Message[Any]]) -> None:
            batches.append([m.id for m in msgs])

        task = asyncio.create_task(sub.run_batch(handler, max_batch=10, max_wait=0.1))
        await until(lambda: sum(map(len, batches)) >= 25)
        sub.stop()
        await task
        assert sorted(i for b in batches for i in b) == sorted(sent)
        assert max(map(len, batches)) == 10
