"""The receiver fetches ahead and notes the next attempt of what it fetched before ``receive`` asks for it;
a graceful close writes exact counts, so records that were only read ahead come back as first attempts."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

import msgbus
from integration.brokers import endpoint
from msgbus_kafka import _codec, _receiver

pytestmark = pytest.mark.integration

N, PREFETCH = 100, 10
READ_AHEAD_BYTES = 32 * 1024 * 1024


async def _notes(bus: msgbus.Bus, group: str) -> _codec.PartitionNotes:
    offsets = await bus._adapter.admin.list_consumer_group_offsets(group)  # type: ignore[attr-defined]
    (meta,) = offsets.values()  # one partition
    return _codec.decode_notes(meta.metadata)


async def test_read_ahead_is_noted_and_a_graceful_close_leaves_exact_counts() -> None:
    url = f"{endpoint('kafka').url}?partitions=1"
    queue = f"ahead-{uuid.uuid4().hex[:10]}"
    async with msgbus.connect(url) as bus:
        sent = await bus.producer(queue).send_many([{"i": i} for i in range(N)])
        consumer = bus.consumer(queue, prefetch=PREFETCH)
        first: list[msgbus.Message[Any]] = []
        while len(first) < PREFETCH:
            first += await consumer.receive(PREFETCH - len(first), timeout=5.0)
        assert [m.body["i"] for m in first] == list(range(PREFETCH))
        group = consumer._inbox.receiver.group  # type: ignore[union-attr]

        # Records beyond the ten handed out are fetched and noted as attempt 1 already, at most three credits,
        # and the credit after them is pre-noted (not fetched yet: ``test_pre_notes...``).
        for _ in range(100):
            noted = (await _notes(bus, group)).attempts
            if len(noted) > PREFETCH:
                break
            await asyncio.sleep(0.05)
        assert len(noted) > PREFETCH, noted
        assert set(noted) <= set(range(5 * PREFETCH)) and set(noted.values()) == {1}, noted

        for msg in first[:5]:
            await msg.ack()
        await consumer.close()  # five acked, five held: a graceful hand-over

        notes = await _notes(bus, group)
        assert dict(notes.attempts) == {i: 1 for i in range(5, PREFETCH)}, notes  # exact: no read-ahead claims

        again = bus.consumer(queue, prefetch=50)
        got: dict[str, msgbus.Message[Any]] = {}
        while len(got) < N - 5:
            for msg in await again.receive(50, timeout=5.0):
                assert msg.id not in got, f"{msg.id} delivered twice"
                got[msg.id] = msg
                await msg.ack()
        await again.close()
    assert set(got) == set(sent[5:])  # 95 left, 95 received, 0 lost, 0 dup
    attempts = {m.body["i"]: m.attempt for m in got.values()}
    assert {i for i, a in attempts.items() if a == 2} == set(range(5, PREFETCH))
    assert {i for i, a in attempts.items() if a == 1} == set(range(PREFETCH, N))


async def test_pre_notes_hand_out_a_new_record_without_a_commit() -> None:
    """Once a commit is stored, the next ``prefetch`` offsets are claimed as delivered once (pre-notes): a record
    that arrives there is handed out without a commit between fetch and handler (one record's latency), and a
    graceful close drops the claims. Without pre-notes, the receive waits for a note commit (``commits == 1``)."""
    url = f"{endpoint('kafka').url}?partitions=1"
    queue = f"pre-notes-{uuid.uuid4().hex[:10]}"
    async with msgbus.connect(url) as bus:
        producer = bus.producer(queue)
        await producer.send_many([{"i": i} for i in range(PREFETCH)])
        consumer = bus.consumer(queue, prefetch=PREFETCH)
        got: list[msgbus.Message[Any]] = []
        while len(got) < PREFETCH:
            got += await consumer.receive(PREFETCH, timeout=5.0)
        for msg in got:
            await msg.ack()
        receiver: Any = consumer._inbox.receiver
        await receiver.flush()  # offset 10 committed, 10..19 pre-noted
        group = receiver.group
        assert dict((await _notes(bus, group)).attempts) == {i: 1 for i in range(PREFETCH, 2 * PREFETCH)}

        commits = 0
        real = receiver._commit

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal commits
            commits += 1
            return await real(*args, **kwargs)

        receiver._commit = counted
        await producer.send({"i": PREFETCH})
        (late,) = await consumer.receive(1, timeout=5.0)
        assert (late.body["i"], late.attempt, commits) == (PREFETCH, 1, 0)
        await late.ack()
        await receiver.flush()  # everything stored: the close has nothing left to commit but taking back claims
        await consumer.close()  # a graceful hand-over: exact counts, no pre-notes left
        notes = await _notes(bus, group)
        assert dict(notes.attempts) == {}, notes


def _read_ahead_bytes(receiver: Any) -> int:
    """Bytes of the values the receiver has fetched and not handed out (what the read-ahead holds)."""
    held = 0
    for part in receiver._parts.values():
        held += sum(len(raw.value or b"") for raw in part.loading or ())
        held += sum(len(e.record.body) for e in part.entries.values() if e.state == _receiver._FETCHED)
    return held


async def test_read_ahead_is_bounded_by_bytes_with_large_records() -> None:
    """With 900 kB records and prefetch 100 the count bound (300 records, 270 MB) never bites: the read-ahead
    held every record of the partition. It stops at READ_AHEAD_BYTES (32 MiB) plus one fetch."""
    big, n, prefetch = 900_000, 45, 100  # 40.5 MB, past the byte bound
    url = f"{endpoint('kafka').url}?partitions=1"
    queue = f"ahead-bytes-{uuid.uuid4().hex[:10]}"
    async with msgbus.connect(url) as bus:
        producer = bus.producer(queue)
        for i in range(0, n, 5):
            await producer.send_many([bytes([i + j]) * big for j in range(5)])
        consumer = bus.consumer(queue, prefetch=prefetch)
        (first,) = await consumer.receive(1, timeout=10.0)
        receiver = consumer._inbox.receiver
        peak = 0
        for _ in range(150):  # 3 s for the pump to read as far ahead as it will
            peak = max(peak, _read_ahead_bytes(receiver))
            await asyncio.sleep(0.02)
        one_fetch = max(1_048_576, (bus.capabilities.max_message_size or 0) + 64 * 1024)  # a partition's fetch
        assert peak <= READ_AHEAD_BYTES + one_fetch, f"read ahead {peak / 1e6:.1f} MB"
        got = [first]
        await first.ack()
        while len(got) < n:
            batch = await consumer.receive(50, timeout=5.0)
            got += batch
            for msg in batch:
                await msg.ack()
    assert sorted(m.payload[0] for m in got) == list(range(n))  # 45 sent, 45 received, 0 lost, 0 dup
    assert _receiver.READ_AHEAD_BYTES == READ_AHEAD_BYTES  # the figure docs/adapters/kafka.md gives
