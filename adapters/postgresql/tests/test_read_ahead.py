"""The receiver's read-ahead against a real server: handed out once, given back uncounted, never handed out stale,
and what a consumer killed while holding it costs. Exact counts: N sent, N received, 0 lost, 0 duplicates."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import msgbus
from msgbus.adapter import Delivery, Endpoint, Receiver, Record
from msgbus.errors import ConnectionLost
from msgbus_postgresql import PostgresAdapter
from msgbus_postgresql._receiver import READ_AHEAD_MIN, PostgresReceiver

MakeAdapter = Callable[..., Awaitable[PostgresAdapter]]
QUEUE = Endpoint("queue", "ahead")
BATCH = max(READ_AHEAD_MIN, 40)  # a full batch of this many reads ahead


def _records(n: int, tag: str = "m") -> list[Record]:
    return [Record(body=f"{tag}{i}".encode(), id=f"{tag}{i:04d}") for i in range(n)]


async def _drain(receiver: Receiver, expected: int, *, ask: int = 100, rounds: int = 100) -> list[Delivery]:
    got: list[Delivery] = []
    for _ in range(rounds):
        if len(got) >= expected:
            break
        got += await receiver.receive(ask, 0.1)
    return got


def _ahead(receiver: Receiver) -> asyncio.Future[list[Any]]:
    """The receiver's read-ahead lease (it must have one)."""
    assert isinstance(receiver, PostgresReceiver) and receiver._ahead is not None, "no read-ahead lease in flight"
    return receiver._ahead.task


async def test_read_ahead_rows_are_handed_out_exactly_once(make_adapter: MakeAdapter) -> None:
    """Receives of changing sizes (what a read-ahead holds beyond a smaller ask is handed out next), all acked."""
    bus = await make_adapter()
    await bus.declare(QUEUE)
    n = 1000
    await bus.send(QUEUE, _records(n))
    r = await bus.receiver(QUEUE, prefetch=100)
    seen: Counter[str] = Counter()
    served = 0  # receives that found a read-ahead lease to take from
    asks = [BATCH, 100, BATCH + 7, 64]
    for i in range(200):
        if sum(seen.values()) >= n:
            break
        assert isinstance(r, PostgresReceiver)
        served += r._ahead is not None or bool(r._kept)
        batch = await r.receive(asks[i % len(asks)], 0.5)
        assert len(batch) <= asks[i % len(asks)]
        seen.update(d.record.id for d in batch)
        assert all(d.attempt == 1 for d in batch)
        await r.ack_many(batch)
    assert len(seen) == n and sum(seen.values()) == n  # n sent, n received, 0 lost, 0 duplicates
    assert served >= 10
    assert await r.receive(BATCH, 0.2) == []
    async with asyncio.timeout(5):
        await r.close()
    assert await bus.stats(QUEUE) == {"depth": 0, "in_flight": 0, "dead_letters": 0}


@pytest.mark.usefixtures("make_adapter")  # its cleanup drops this test's schema
async def test_run_with_read_ahead_handles_each_message_once(
    pg_url: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    start = PostgresReceiver._read_ahead

    def counted(self: PostgresReceiver, limit: int) -> bool:
        started = start(self, limit)
        reads.append(started)
        return started

    monkeypatch.setattr(PostgresReceiver, "_read_ahead", counted)
    n = 3000
    handled: Counter[str] = Counter()
    attempts: Counter[int] = Counter()
    async with msgbus.connect(f"{pg_url}?schema={schema}") as bus:
        sent = set(await bus.producer("ahead-run").send_many([{"i": i} for i in range(n)]))
        consumer = bus.consumer("ahead-run")
        done = asyncio.Event()

        async def handle(msg: msgbus.Message[Any]) -> None:
            handled[msg.id] += 1
            attempts[msg.attempt] += 1
            if len(handled) == n:
                done.set()

        task = asyncio.create_task(consumer.run(handle, concurrency=16))
        async with asyncio.timeout(60):
            await done.wait()
        consumer.stop()
        await task
        await consumer.close()
    assert set(handled) == sent and len(sent) == n  # n sent, n handled, 0 lost
    assert sum(handled.values()) == n and attempts == {1: n}  # 0 duplicates, none counted twice
    assert sum(reads) >= 10  # the consumer did read ahead


async def test_a_batch_with_a_redelivery_reads_nothing_ahead(make_adapter: MakeAdapter) -> None:
    """A consumer working through redeliveries (what a dead consumer held, or a nack) holds nothing beyond its
    batch: if one of them kills it, nothing else is counted for it. First deliveries read ahead again."""
    bus = await make_adapter()
    await bus.declare(QUEUE)
    await bus.send(QUEUE, _records(3 * BATCH))
    r = await bus.receiver(QUEUE, prefetch=BATCH)
    assert isinstance(r, PostgresReceiver)
    (first,) = await r.receive(1, 5.0)
    await first.nack()
    mixed = await r.receive(BATCH, 5.0)
    assert len(mixed) == BATCH and sorted(d.attempt for d in mixed)[-1] == 2  # full, with the redelivery
    assert r._ahead is None and not r._kept
    fresh = await r.receive(BATCH, 5.0)
    assert len(fresh) == BATCH and {d.attempt for d in fresh} == {1}
    rest = await _ahead(r)  # a full batch of first deliveries reads ahead
    assert len(rest) == BATCH
    await r.ack_many([*mixed, *fresh, *await _drain(r, BATCH, ask=BATCH)])
    assert await bus.stats(QUEUE) == {"depth": 0, "in_flight": 0, "dead_letters": 0}


async def _read_ahead_back_uncounted(
    bus: PostgresAdapter, other: Receiver, holder: Receiver, held: list[Delivery]
) -> None:
    """``other`` gets the rows ``holder`` read ahead (the second batch) once each, at attempt 1 (given back uncounted:
    nobody attempted them); then ``holder``'s batch and those are acked, and the queue is empty."""
    got = await other.receive(2 * BATCH, 5.0)
    assert sorted(d.record.id for d in got) == [f"m{i:04d}" for i in range(BATCH, 2 * BATCH)]  # once each
    assert {d.attempt for d in got} == {1}
    await holder.ack_many(held)
    await other.ack_many(got)
    assert await bus.stats(QUEUE) == {"depth": 0, "in_flight": 0, "dead_letters": 0}


async def test_release_gives_the_read_ahead_to_another_consumer_uncounted(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()  # visibility_timeout 30 s: only a give-back makes them visible within the test
    await bus.declare(QUEUE)
    await bus.send(QUEUE, _records(2 * BATCH))
    holder = await bus.receiver(QUEUE, prefetch=BATCH)
    other = await bus.receiver(QUEUE, prefetch=2 * BATCH)
    held = await holder.receive(BATCH, 5.0)
    assert len(held) == BATCH
    assert len(await _ahead(holder)) == BATCH  # the rest of the queue, leased ahead
    assert await other.receive(2 * BATCH, 0.3) == []  # leased: nobody else gets them
    await holder.release()
    await _read_ahead_back_uncounted(bus, other, holder, held)
    assert await holder.receive(BATCH, 0.2) == []  # receiving after release() works (nothing left to get)


async def test_close_gives_the_read_ahead_back_uncounted_even_mid_lease(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()
    await bus.declare(QUEUE)
    await bus.send(QUEUE, _records(2 * BATCH))
    holder = await bus.receiver(QUEUE, prefetch=BATCH)
    held = await holder.receive(BATCH, 5.0)
    _ahead(holder)  # in flight: closed before its answer came, its rows are given back once it comes
    await holder.close()
    other = await bus.receiver(QUEUE, prefetch=2 * BATCH)
    await _read_ahead_back_uncounted(bus, other, holder, held)  # a closed receiver's deliveries can still be settled


async def test_a_receive_cancelled_while_waiting_for_the_read_ahead_loses_nothing(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()
    await bus.declare(QUEUE)
    await bus.send(QUEUE, _records(3 * BATCH))
    r = await bus.receiver(QUEUE, prefetch=BATCH)
    first = await r.receive(BATCH, 5.0)
    waiting = asyncio.create_task(r.receive(BATCH, 5.0))
    await asyncio.sleep(0)  # it waits for the read-ahead lease now
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    rest = await _drain(r, 2 * BATCH, ask=BATCH)
    ids = [d.record.id for d in first + rest]
    assert sorted(ids) == [f"m{i:04d}" for i in range(3 * BATCH)]  # 0 lost, 0 duplicates
    assert {d.attempt for d in first + rest} == {1}


async def test_read_ahead_is_not_handed_out_once_another_consumer_may_hold_it(make_adapter: MakeAdapter) -> None:
    """A read-ahead whose lease ran out while it waited (the loop too busy to run the timer that gives it back)
    is not handed out: another consumer has it by then, and a message must not be handled twice."""
    bus = await make_adapter(visibility_timeout=0.5)
    await bus.declare(QUEUE)
    await bus.send(QUEUE, _records(2 * BATCH))
    slow = await bus.receiver(QUEUE, prefetch=BATCH)
    assert isinstance(slow, PostgresReceiver)
    first = await slow.receive(BATCH, 5.0)
    assert slow._expiry is not None
    slow._expiry.cancel()  # as if the loop were blocked past the give-back
    await slow.ack_many(first)
    await _ahead(slow)
    await asyncio.sleep(0.7)  # the read-ahead's lease runs out
    other = await bus.receiver(QUEUE, prefetch=2 * BATCH)
    taken = await other.receive(2 * BATCH, 5.0)
    assert sorted(d.record.id for d in taken) == [f"m{i:04d}" for i in range(BATCH, 2 * BATCH)]
    assert {d.attempt for d in taken} == {2}  # the read-ahead's lease counted, as a dying consumer's
    assert await slow.receive(BATCH, 0.2) == []  # not the rows the other consumer holds now
    await other.ack_many(taken)
    assert await bus.stats(QUEUE) == {"depth": 0, "in_flight": 0, "dead_letters": 0}


async def test_read_ahead_older_than_its_share_of_the_lease_is_given_back_by_its_timer(
    make_adapter: MakeAdapter,
) -> None:
    bus = await make_adapter(visibility_timeout=2)
    await bus.declare(QUEUE)
    await bus.send(QUEUE, _records(2 * BATCH))
    idle = await bus.receiver(QUEUE, prefetch=BATCH)
    held = await idle.receive(BATCH, 5.0)
    await _ahead(idle)
    other = await bus.receiver(QUEUE, prefetch=2 * BATCH)
    loop = asyncio.get_running_loop()
    began = loop.time()
    got = await _drain(other, BATCH, ask=2 * BATCH, rounds=30)
    waited = loop.time() - began
    assert sorted(d.record.id for d in got) == [f"m{i:04d}" for i in range(BATCH, 2 * BATCH)]
    assert {d.attempt for d in got} == {1}  # given back uncounted
    assert waited < 1.5  # at a quarter of the 2 s lease, not when it ran out
    await idle.ack_many(held)
    await other.ack_many(got)


async def test_a_failed_read_ahead_raises_a_typed_error_and_loses_nothing(
    make_adapter: MakeAdapter,
    proxied: tuple[Any, str],  # a SilentProxy (integration/_proxy.py), and the URL through it
) -> None:
    proxy, url = proxied
    unretrieved: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        bus = await make_adapter(url, command_timeout=1, connect_timeout=1, reconnect_timeout=1)
        await bus.declare(QUEUE)
        await bus.send(QUEUE, _records(3 * BATCH))
        r = await bus.receiver(QUEUE, prefetch=BATCH)
        first = await r.receive(BATCH, 5.0)
        proxy.silent = True  # the read-ahead lease (and its retries) go unanswered
        with pytest.raises(ConnectionLost):
            async with asyncio.timeout(10):
                await r.receive(BATCH, 5.0)
        proxy.silent = False
        rest = await _drain(r, 2 * BATCH, ask=BATCH, rounds=100)
        got = Counter(d.record.id for d in first + rest)
        assert sorted(got) == [f"m{i:04d}" for i in range(3 * BATCH)]  # 0 lost
        assert set(got.values()) == {1}  # 0 duplicates
        assert {d.attempt for d in rest} == {1}  # the lease that failed never reached the server
        await r.close()
    finally:
        gc.collect()
        loop.set_exception_handler(None)
    assert not [c for c in unretrieved if "never retrieved" in str(c.get("message"))]


_CHILD = """
import asyncio, sys
from msgbus._url import parse_url
from msgbus.adapter import Endpoint
from msgbus_postgresql import create

async def main():
    parsed = parse_url(sys.argv[1])
    reader = parsed.reader({"schema": sys.argv[2], "visibility_timeout": 1})
    bus = create(parsed, reader)
    reader.finish()
    await bus.open()
    r = await bus.receiver(Endpoint("queue", "ahead"), prefetch=int(sys.argv[3]))
    got = await r.receive(int(sys.argv[3]), 5.0)
    ahead = await r._ahead.task
    print(len(got), len(ahead), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_consumer_killed_holding_read_ahead_loses_nothing(make_adapter: MakeAdapter, pg_url: str) -> None:
    """SIGKILLed with a batch handed out and a batch read ahead: both come back when their lease runs out, counted
    once (attempt 2: the server cannot tell what the dead process handed to a handler); the rest at attempt 1."""
    bus = await make_adapter()
    await bus.declare(QUEUE)
    n = 2 * BATCH + 10
    await bus.send(QUEUE, _records(n))
    schema = bus.options.schema
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, pg_url, schema, str(BATCH), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(30):
            line = await child.stdout.readline()
        assert line.split() == [str(BATCH).encode()] * 2  # a batch handed out, a batch read ahead
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    r = await bus.receiver(QUEUE, prefetch=n)
    got = await _drain(r, n, ask=n, rounds=100)
    by_id = Counter(d.record.id for d in got)
    assert sorted(by_id) == [f"m{i:04d}" for i in range(n)] and set(by_id.values()) == {1}  # 0 lost, 0 duplicates
    attempts = {d.record.id: d.attempt for d in got}
    assert {attempts[f"m{i:04d}"] for i in range(2 * BATCH)} == {2}
    assert {attempts[f"m{i:04d}"] for i in range(2 * BATCH, n)} == {1}
    await r.ack_many(got)
