"""Send coalescing: concurrent single sends share adapter calls, and each caller keeps its own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

import msgbus
from msgbus._coalesce import Coalescer
from msgbus.adapter import Record
from msgbus.errors import ConnectionLost, InvalidMessage


def record(i: int | str) -> Record:
    return Record(body=str(i).encode(), id=f"id-{i}", headers={"seq": str(i)})


class Backend:
    """Stands in for an adapter's send: stores records after a round trip; can refuse or break."""

    def __init__(self, delay: float = 0.005) -> None:
        self.delay = delay
        self.calls: list[list[str]] = []
        self.stored: list[str] = []
        self.down = False

    async def send(self, records: Sequence[Record]) -> None:
        ids = [r.id for r in records]
        self.calls.append(ids)
        if any(r.body == b"bad" for r in records):
            raise InvalidMessage("bad body")  # refused before anything is stored, like an adapter's checks
        await asyncio.sleep(self.delay)
        if self.down:
            raise ConnectionLost("broker went away")
        self.stored.extend(ids)


async def test_concurrent_sends_share_calls_and_each_is_stored_once() -> None:
    backend = Backend()
    gate = Coalescer(backend.send)
    await asyncio.gather(*(gate.send(record(i)) for i in range(200)))
    assert sorted(backend.stored) == sorted(f"id-{i}" for i in range(200))
    assert len(backend.stored) == 200  # 200 sent, 200 stored, none twice
    assert backend.calls == [[f"id-{i}" for i in range(200)]]  # ready together: one call, in order


async def test_a_lone_send_goes_straight_through() -> None:
    backend = Backend()
    gate = Coalescer(backend.send)
    for i in range(5):
        await gate.send(record(i))
    assert backend.calls == [[f"id-{i}"] for i in range(5)]


async def test_batches_are_capped() -> None:
    backend = Backend()
    gate = Coalescer(backend.send, max_batch=64)
    await asyncio.gather(*(gate.send(record(i)) for i in range(201)))
    assert [len(c) for c in backend.calls] == [64, 64, 64, 9]
    assert len(set(backend.stored)) == len(backend.stored) == 201


async def test_a_refused_record_fails_only_its_own_caller() -> None:
    backend = Backend()
    gate = Coalescer(backend.send)
    bodies: list[int | str] = [0, 1, 2, "bad", 4, 5]
    results = await asyncio.gather(*(gate.send(record(b)) for b in bodies), return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["NoneType"] * 3 + ["InvalidMessage"] + ["NoneType"] * 2
    assert sorted(backend.stored) == sorted(f"id-{b}" for b in bodies if b != "bad")


async def test_a_broker_failure_reaches_every_caller_of_the_batch() -> None:
    backend = Backend()
    gate = Coalescer(backend.send)
    first = asyncio.ensure_future(gate.send(record(0)))
    await asyncio.sleep(0)
    backend.down = True
    results = await asyncio.gather(*(gate.send(record(i)) for i in range(1, 6)), return_exceptions=True)
    assert all(isinstance(r, ConnectionLost) for r in results)
    with pytest.raises(ConnectionLost):
        await first
    assert backend.stored == []


async def busy_gate() -> tuple[Backend, asyncio.Future[None], list[asyncio.Future[None]]]:
    """A send of id-0 in flight (50 ms) and sends of id-1..3 queued behind it."""
    backend = Backend(delay=0.05)
    gate = Coalescer(backend.send)
    first = asyncio.ensure_future(gate.send(record(0)))
    await asyncio.sleep(0)
    waiters = [asyncio.ensure_future(gate.send(record(i))) for i in range(1, 4)]
    await asyncio.sleep(0)
    return backend, first, waiters


async def test_a_cancelled_waiter_is_never_sent_and_others_are() -> None:
    backend, first, waiters = await busy_gate()
    waiters[1].cancel()
    await asyncio.gather(first, waiters[0], waiters[2])
    assert waiters[1].cancelled()
    assert sorted(backend.stored) == ["id-0", "id-1", "id-3"]


async def test_cancelling_a_caller_in_a_batch_does_not_cut_the_batch_short() -> None:
    backend, first, waiters = await busy_gate()
    await first
    await asyncio.sleep(0.01)  # the batch of 1..3 is now with the backend
    waiters[0].cancel()
    await asyncio.gather(*waiters[1:])
    assert sorted(backend.stored) == ["id-0", "id-1", "id-2", "id-3"]  # stored even though its caller left


async def test_bus_sends_coalesce_on_a_real_backend(tmp_path: object) -> None:
    """Through the public API on sqlite: 300 concurrent sends, every id received exactly once."""
    async with msgbus.connect(f"sqlite:///{tmp_path}/c.db") as bus:
        producer = bus.producer("q")
        ids = await asyncio.gather(*(producer.send({"i": i}, headers={"seq": str(i)}) for i in range(300)))
        assert len(set(ids)) == 300
        got = {}
        async with bus.consumer("q", prefetch=100) as consumer:
            while len(got) < 300:
                for msg in await consumer.receive(max_messages=100, timeout=5):
                    assert msg.body == {"i": int(msg.headers["seq"])}
                    got[msg.id] = got.get(msg.id, 0) + 1
                    await msg.ack()
        assert set(got) == set(ids) and set(got.values()) == {1}


async def test_a_caller_cancelled_after_its_batch_leader_was_is_never_sent() -> None:
    """The leader of a forming batch is cancelled, then one of those who joined it: the other still goes out,
    the cancelled ones never do."""
    backend = Backend()
    gate = Coalescer(backend.send)
    tasks = [asyncio.ensure_future(gate.send(record(i))) for i in range(3)]
    await asyncio.sleep(0)  # 0 leads and yields once; 1 and 2 join its batch
    tasks[0].cancel()
    tasks[1].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert tasks[0].cancelled() and tasks[1].cancelled() and tasks[2].result() is None
    assert backend.stored == ["id-2"]


async def test_a_caller_cancelled_while_its_batch_is_split_does_not_strand_the_others() -> None:
    """A batch refused for one record is re-sent one by one; a caller leaving meanwhile must not make the
    split skip anyone (each remaining caller gets its own outcome, none waits forever)."""
    backend = Backend(delay=0.02)
    gate = Coalescer(backend.send)
    bodies: list[int | str] = [1, 2, "bad", 4]
    callers = [asyncio.ensure_future(gate.send(record(b))) for b in bodies]  # one batch, refused at once
    await asyncio.sleep(0.03)  # the split has sent id-1 alone and is sending id-2
    callers[1].cancel()
    results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 2)
    assert [type(r).__name__ for r in results] == ["NoneType", "CancelledError", "InvalidMessage", "NoneType"]
    assert sorted(backend.stored) == ["id-1", "id-2", "id-4"]  # id-2 was with the backend when its caller left
