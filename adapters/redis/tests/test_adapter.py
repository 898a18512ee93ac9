"""The adapter against a real Redis, at the SPI level: exact counts, no mocked client."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import cast

import pytest
import redis.asyncio

from msgbus.adapter import (
    HEADER_ATTEMPTS,
    HEADER_DEAD_LETTER_REASON,
    HEADER_DEAD_LETTER_SOURCE,
    Delivery,
    Endpoint,
    Receiver,
    Record,
)
from msgbus.errors import ClosedError, ConfigError, ConnectionLost, MessageTooLarge, TopologyError
from msgbus_redis import RedisAdapter

MakeAdapter = Callable[..., Awaitable[RedisAdapter]]

QUEUE = Endpoint("queue", "jobs")
TOPIC = Endpoint("topic", "events")


def _records(n: int, tag: str = "m") -> list[Record]:
    return [
        Record(body=f"{tag}{i}".encode(), id=f"{tag}{i}", headers={"n": str(i)}, key=f"k{i % 3}", timestamp=1.5 + i)
        for i in range(n)
    ]


async def _drain(receiver: Receiver, expected: int, *, ack: bool = True, rounds: int = 200) -> list[Delivery]:
    """Receive until ``expected`` deliveries arrived (or ``rounds`` empty polls), acking each batch."""
    got: list[Delivery] = []
    for _ in range(rounds):
        if len(got) >= expected:
            break
        batch = await receiver.receive(100, 0.05)
        if ack and batch:
            await receiver.ack_many(batch)
        got += batch
    return got


async def test_queue_keeps_messages_sent_before_any_consumer(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()
    await bus.declare(QUEUE)
    sent = _records(250)
    await bus.send(QUEUE, sent[:1])
    await bus.send(QUEUE, sent[1:])
    receiver = await bus.receiver(QUEUE, prefetch=100)
    got = await _drain(receiver, 250)
    assert Counter(d.record.id for d in got) == Counter(r.id for r in sent)  # 250 received, 0 lost, 0 dup
    assert {d.record.id: d.record for d in got} == {r.id: r for r in sent}  # every field round-trips
    assert all(d.attempt == 1 for d in got)
    assert await receiver.receive(100, 0.0) == []


async def test_acked_queue_entries_are_deleted(make_adapter: MakeAdapter, raw: redis.asyncio.Redis) -> None:
    bus = await make_adapter()
    await bus.declare(QUEUE)
    await bus.send(QUEUE, _records(20))
    receiver = await bus.receiver(QUEUE, prefetch=50)
    got = await _drain(receiver, 20)
    assert len(got) == 20
    stream = bus._route(QUEUE).streams[0]
    assert await raw.xlen(stream) == 0
    assert (await raw.xpending(stream, "msgbus"))["pending"] == 0


async def test_competing_consumers_split_the_queue(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()
    await bus.declare(QUEUE)
    await bus.send(QUEUE, _records(300))
    first, second = await bus.receiver(QUEUE, 10), await bus.receiver(QUEUE, 10)
    counts: Counter[str] = Counter()
    per_receiver = [0, 0]
    for _ in range(200):
        if sum(counts.values()) >= 300:
            break
        for i, receiver in enumerate((first, second)):
            batch = await receiver.receive(10, 0.05)
            per_receiver[i] += len(batch)
            counts.update(d.record.id for d in batch)
            await receiver.ack_many(batch)
    assert len(counts) == 300 and sum(counts.values()) == 300  # together every message, none twice
    assert per_receiver[0] > 0 and per_receiver[1] > 0


async def test_fan_out_gives_every_subscription_what_is_published_after_it(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()
    await bus.declare(TOPIC)
    await bus.send(TOPIC, _records(5, "early"))  # no subscription yet: nobody gets these
    subs = [Endpoint("topic", "events", s) for s in ("billing", "audit")]
    for sub in subs:
        await bus.declare(sub)
    await bus.send(TOPIC, _records(100))
    for sub in subs:
        got = await _drain(await bus.receiver(sub, 100), 100)
        assert sorted(d.record.id for d in got) == sorted(r.id for r in _records(100))


async def test_nack_redelivers_with_growing_attempt_and_stable_id(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()
    for endpoint in (QUEUE, Endpoint("topic", "events", "retrying")):
        await bus.declare(endpoint)
        await bus.send(QUEUE if endpoint.kind == "queue" else TOPIC, _records(1))
        receiver = await bus.receiver(endpoint, 10)
        attempts = []
        for _ in range(3):
            (delivery,) = await _drain(receiver, 1, ack=False)
            attempts.append(delivery.attempt)
            assert delivery.record == _records(1)[0]
            await delivery.nack()
        (last,) = await _drain(receiver, 1)
        assert [*attempts, last.attempt] == [1, 2, 3, 4]
        assert await receiver.receive(10, 0.0) == []


async def test_nack_with_delay_holds_the_message_back(make_adapter: MakeAdapter, raw: redis.asyncio.Redis) -> None:
    bus = await make_adapter(poll_interval=0.05)
    sub = Endpoint("topic", "events", "later")
    await bus.declare(sub)
    await bus.send(TOPIC, _records(1))
    receiver = await bus.receiver(sub, 10)
    (delivery,) = await _drain(receiver, 1, ack=False)
    await delivery.nack(delay=30.0)
    await delivery.nack(delay=30.0)  # no longer pending: nothing more is stored
    assert await receiver.receive(10, 0.2) == []  # far from due
    zset = bus._route(sub).retry_delayed
    assert await raw.zcard(zset) == 1
    members = cast(list[bytes], await raw.zrange(zset, 0, -1))
    await raw.zadd(zset, dict.fromkeys(members, 0))  # make it due now
    (due,) = await _drain(receiver, 1)
    assert (due.record, due.attempt) == (_records(1)[0], 2)
    assert await raw.zcard(zset) == 0


async def test_delayed_send_arrives_once_due(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter(poll_interval=0.05)
    sub = Endpoint("topic", "events", "delayed")
    await bus.declare(QUEUE)
    await bus.declare(sub)
    await bus.send(QUEUE, _records(3), delay=0.3)
    await bus.send(TOPIC, _records(2), delay=0.3)
    queue_receiver, sub_receiver = await bus.receiver(QUEUE, 10), await bus.receiver(sub, 10)
    assert await queue_receiver.receive(10, 0.0) == []
    assert sorted(d.record.id for d in await _drain(queue_receiver, 3)) == ["m0", "m1", "m2"]
    assert sorted(d.record.id for d in await _drain(sub_receiver, 2)) == ["m0", "m1"]


async def test_dead_letter_keeps_body_and_headers_and_says_why(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()
    sub = Endpoint("topic", "events", "strict")
    await bus.declare(sub)
    await bus.send(TOPIC, _records(2))
    receiver = await bus.receiver(sub, 10)
    first, second = sorted(await _drain(receiver, 2, ack=False), key=lambda d: d.record.id)
    await first.nack()
    (again,) = await _drain(receiver, 1, ack=False)
    await again.dead_letter("bad order")
    await second.dead_letter("also bad")
    await second.dead_letter("twice")  # nothing pending any more: no second copy
    assert await receiver.receive(10, 0.0) == []
    dead = await _drain(await bus.receiver(Endpoint("topic", "events", "strict", dead_letter=True), 10), 2)
    by_id = {d.record.id: d.record for d in dead}
    assert len(dead) == 2
    assert (
        by_id["m0"].body == b"m0"
        and by_id["m0"].key == "k0"
        and by_id["m0"].headers
        == {
            "n": "0",
            HEADER_DEAD_LETTER_REASON: "bad order",
            HEADER_ATTEMPTS: "2",
            HEADER_DEAD_LETTER_SOURCE: "topic:events/strict",
        }
    )
    assert by_id["m1"].headers[HEADER_DEAD_LETTER_REASON] == "also bad"
    assert all(d.attempt == 1 for d in dead)


async def test_entry_of_a_dead_consumer_is_reclaimed_after_the_visibility_timeout(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter(visibility_timeout=0.3, poll_interval=0.05)
    await bus.declare(QUEUE)
    await bus.send(QUEUE, _records(4))
    dying = await bus.receiver(QUEUE, 10)
    held = await _drain(dying, 4, ack=False)
    assert len(held) == 4
    survivor = await bus.receiver(QUEUE, 10)
    reclaimed = await _drain(survivor, 4)
    assert sorted((d.record.id, d.attempt) for d in reclaimed) == [(f"m{i}", 2) for i in range(4)]
    for d in held:  # the late owner's ack does no harm
        await d.ack()
    assert await survivor.receive(10, 0.0) == []


async def test_extending_keeps_a_message_from_other_consumers(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter(visibility_timeout=0.4, poll_interval=0.05)
    await bus.declare(QUEUE)
    await bus.send(QUEUE, _records(1))
    owner, other = await bus.receiver(QUEUE, 10), await bus.receiver(QUEUE, 10)
    (delivery,) = await _drain(owner, 1, ack=False)
    stolen = []
    for _ in range(8):  # ~0.8 s, twice the visibility timeout, extending every 0.1 s
        await delivery.extend(0.4)
        stolen += await other.receive(10, 0.1)
    assert stolen == []
    await delivery.ack()


async def test_receive_returns_what_it_is_asked_for(make_adapter: MakeAdapter) -> None:
    """The core keeps the prefetch limit: the receiver returns up to ``max_messages``, counting nothing itself."""
    bus = await make_adapter()
    await bus.declare(QUEUE)
    await bus.send(QUEUE, _records(12))
    receiver = await bus.receiver(QUEUE, prefetch=5)
    first = await receiver.receive(5, 2.0)
    assert len(first) == 5
    assert len(await receiver.receive(3, 2.0)) == 3  # at most what it is asked for
    rest = await _drain(receiver, 4, ack=False)  # nothing settled: it still hands out the rest, past prefetch
    assert len(rest) == 4


async def test_topic_trimming_never_drops_what_a_slower_subscription_needs(
    make_adapter: MakeAdapter, raw: redis.asyncio.Redis
) -> None:
    bus = await make_adapter(trim_interval=0.1, poll_interval=0.05)
    fast, slow = Endpoint("topic", "events", "fast"), Endpoint("topic", "events", "slow")
    await bus.declare(fast)
    await bus.declare(slow)
    await bus.send(TOPIC, _records(50))
    fast_receiver = await bus.receiver(fast, 100)
    assert len(await _drain(fast_receiver, 50)) == 50
    for _ in range(4):  # let the fast side's housekeeping trim a few times
        await fast_receiver.receive(10, 0.15)
    stream = bus._route(TOPIC).send_stream
    assert await raw.xlen(stream) == 50  # slow has read nothing: all kept
    slow_receiver = await bus.receiver(slow, 100)
    assert sorted(d.record.id for d in await _drain(slow_receiver, 50)) == sorted(r.id for r in _records(50))
    for _ in range(4):
        await slow_receiver.receive(10, 0.15)
    assert await raw.xlen(stream) <= 1  # the last delivered entry may stay as the groups' position


async def test_verify_only_reports_missing_topology(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()
    for endpoint in (QUEUE, TOPIC, Endpoint("topic", "events", "s")):
        with pytest.raises(TopologyError):
            await bus.declare(endpoint, create=False)
        await bus.declare(endpoint)
        await bus.declare(endpoint)  # idempotent
        await bus.declare(endpoint, create=False)


async def test_oversized_messages_are_refused_before_sending(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter(max_message_size=100)
    await bus.declare(QUEUE)
    with pytest.raises(MessageTooLarge):
        await bus.send(QUEUE, [Record(body=b"ok", id="a"), Record(body=b"x" * 101, id="b")])
    receiver = await bus.receiver(QUEUE, 10)
    assert await receiver.receive(10, 0.05) == []  # nothing of the batch was stored


async def test_foreign_entries_are_delivered_by_the_field_convention(
    make_adapter: MakeAdapter, raw: redis.asyncio.Redis
) -> None:
    """Entries written with a plain XADD come in the same receive as msgbus's own, none with a ``problem``: one
    with a body field by the convention, one without as a JSON object of its fields; a nack keeps the entry id
    as the message id."""
    bus = await make_adapter()
    await bus.declare(QUEUE)
    stream = bus._route(QUEUE).send_stream
    plain = (await raw.xadd(stream, {"body": b"{}", "origin": "legacy", "content-type": "application/json"})).decode()
    bare = (await raw.xadd(stream, {"data": "hello"})).decode()
    await bus.send(QUEUE, _records(1))
    receiver = await bus.receiver(QUEUE, 10)
    got = {d.record.id: d for d in await _drain(receiver, 3, ack=False)}
    assert set(got) == {plain, bare, "m0"} and all(d.problem is None for d in got.values())
    first = got[plain].record
    assert (first.body, first.headers, first.content_type) == (b"{}", {"origin": "legacy"}, "application/json")
    assert (got[bare].record.body, got[bare].record.content_type) == (b'{"data":"hello"}', "application/json")
    await got[plain].nack()
    await receiver.ack_many([got[bare], got["m0"]])
    (again,) = await _drain(receiver, 1)
    assert (again.record, again.attempt) == (first, 2)


async def _reclaimed(
    bus: RedisAdapter, raw: redis.asyncio.Redis
) -> tuple[Delivery, Delivery, Receiver, Callable[[], Awaitable[str]]]:
    """One entry held by a receiver whose lock expired (``late``) and reclaimed by another (``now_owned``)."""
    await bus.declare(QUEUE)
    await bus.send(QUEUE, _records(1))
    slow, other = await bus.receiver(QUEUE, 10), await bus.receiver(QUEUE, 10)
    (late,) = await _drain(slow, 1, ack=False)
    (now_owned,) = await _drain(other, 1, ack=False)  # reclaimed once the lock expired
    assert now_owned.attempt == 2
    stream, group = bus._route(QUEUE).streams[0], bus._route(QUEUE).group

    async def owner() -> str:
        (entry,) = await raw.xpending_range(stream, group, "-", "+", 10)
        return cast(bytes, entry["consumer"]).decode()

    assert await owner() == other._consumer  # type: ignore[attr-defined]
    return late, now_owned, other, owner


async def test_extending_a_lock_that_expired_does_not_take_the_entry_back(
    make_adapter: MakeAdapter, raw: redis.asyncio.Redis
) -> None:
    """XCLAIM with min-idle 0 took the entry back from the consumer that had reclaimed it: both handled it."""
    bus = await make_adapter(visibility_timeout=0.3, poll_interval=0.05)
    late, now_owned, other, owner = await _reclaimed(bus, raw)
    await late.extend(0.3)
    assert await owner() == other._consumer, "the late holder's extend took the entry back"  # type: ignore[attr-defined]
    await now_owned.ack()
    assert (await raw.xpending(bus._route(QUEUE).streams[0], bus._route(QUEUE).group))["pending"] == 0


async def test_settling_after_the_lock_expired_changes_nothing(
    make_adapter: MakeAdapter, raw: redis.asyncio.Redis
) -> None:
    """A late nack or dead-letter settled an entry another consumer had reclaimed: a second copy went out."""
    bus = await make_adapter(visibility_timeout=0.3, poll_interval=0.05)
    late, now_owned, other, owner = await _reclaimed(bus, raw)
    await late.nack()
    await late.dead_letter("late")
    stored = [await raw.xlen(s) for s in bus._route(QUEUE).streams]
    assert sum(stored) == 1, f"the late holder's settle stored a second copy: {stored}"
    assert await owner() == other._consumer  # type: ignore[attr-defined]
    assert await other.receive(10, 0.1) == [], "nothing came back for the owner"
    await now_owned.ack()
    dlq = await bus.receiver(Endpoint("queue", "jobs", dead_letter=True), 10)
    assert await dlq.receive(10, 0.1) == [], "the late dead-letter stored nothing"


async def test_a_lost_group_is_recreated_without_losing_later_messages(
    make_adapter: MakeAdapter, raw: redis.asyncio.Redis
) -> None:
    bus = await make_adapter()
    await bus.declare(QUEUE)
    receiver = await bus.receiver(QUEUE, 10)
    await raw.delete(*bus._route(QUEUE).streams)  # what a restart without persistence looks like
    await bus.send(QUEUE, _records(3))
    assert sorted(d.record.id for d in await _drain(receiver, 3)) == ["m0", "m1", "m2"]


async def test_receiving_from_a_topic_needs_a_subscription(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()
    with pytest.raises(ConfigError):
        await bus.receiver(TOPIC, 10)


async def test_closed_adapter_and_receiver_raise_closed_error(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()
    await bus.declare(QUEUE)
    receiver = await bus.receiver(QUEUE, 10)
    await receiver.close()
    with pytest.raises(ClosedError):
        await receiver.receive(1, 0.0)
    await bus.close()
    await bus.close()
    with pytest.raises(ClosedError):
        await bus.send(QUEUE, _records(1))


async def test_unreachable_server_is_connection_lost() -> None:
    from msgbus._url import parse_url
    from msgbus_redis import create

    url = parse_url("redis://127.0.0.1:1/0?retries=0&connect_timeout=0.5")
    reader = url.reader()
    adapter: RedisAdapter = create(url, reader)
    with pytest.raises(ConnectionLost) as info:
        await adapter.open()
    assert info.value.retryable


async def test_persistence_is_read_from_the_server(make_adapter: MakeAdapter, raw: redis.asyncio.Redis) -> None:
    bus = await make_adapter()
    config = await raw.config_get("append*")
    expected = "none"
    if config.get("appendonly") == "yes":
        expected = "disk" if config.get("appendfsync") == "always" else "process-crash"
    assert bus.capabilities.persistence == expected
    assert (await make_adapter(persistence="disk")).capabilities.persistence == "disk"


async def test_receive_waits_no_longer_than_its_timeout_when_idle(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()
    await bus.declare(QUEUE)
    receiver = await bus.receiver(QUEUE, 10)
    results = await asyncio.gather(*(receiver.receive(10, 0.05) for _ in range(2)))
    assert results == [[], []]


async def test_consumers_of_dead_receivers_are_pruned_once_empty(
    make_adapter: MakeAdapter, raw: redis.asyncio.Redis
) -> None:
    bus = await make_adapter(idle_consumer_timeout=0.2, trim_interval=0.1, poll_interval=0.05)
    await bus.declare(QUEUE)
    await bus.send(QUEUE, _records(2))
    empty, holding = await bus.receiver(QUEUE, 1), await bus.receiver(QUEUE, 1)
    await empty.ack_many(await empty.receive(1, 1.0))  # then it goes silent without close(), as if killed
    assert len(await holding.receive(1, 1.0)) == 1  # never acked
    stream = bus._route(QUEUE).streams[0]
    live = await bus.receiver(QUEUE, 1)
    for _ in range(8):  # 0.8 s of housekeeping by the live receiver
        await live.receive(1, 0.1)
    names = {c["name"].decode() for c in await raw.xinfo_consumers(stream, "msgbus")}
    assert empty._consumer not in names
    assert holding._consumer in names  # pruning it would lose its pending entry


async def test_a_timeout_around_redis_calls_always_takes(make_adapter: MakeAdapter) -> None:
    """A cancel that reaches a Redis call ends it, every time: redis-py sends each command through
    ``asyncio.wait_for``, which on Python 3.11 lost the cancel about one time in two when the write had just
    finished, so a timeout or stop() around a loop of calls never took (it hung the CI run of 12-04). Each round
    here must end by its timeout, never by the loop's own bound."""
    adapter = await make_adapter()
    lost = 0
    for i in range(20):
        calls = 0
        try:
            async with asyncio.timeout(0.02 + (i % 7) * 0.003):
                while calls < 5000:  # the loop's own bound: reached only when the timeout was lost
                    calls += 1
                    await adapter.ping()
        except TimeoutError:
            continue
        lost += 1
    assert lost == 0, f"{lost} of 20 timeouts around Redis calls never took"
