"""``ordering=per_key`` against a real Redis: partitions, leases, take-over after a dead receiver, nacks in place."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import defaultdict
from collections.abc import Awaitable, Callable

import redis.asyncio

from msgbus.adapter import Delivery, Endpoint, Receiver, Record
from msgbus_redis import RedisAdapter

MakeAdapter = Callable[..., Awaitable[RedisAdapter]]

QUEUE = Endpoint("queue", "ordered")
ORDERED = {"ordering": "per_key", "partitions": "4", "visibility_timeout": "1", "poll_interval": "0.05"}


def _keyed(keys: list[str], per_key: int) -> list[Record]:
    return [Record(body=f"{k}#{i}".encode(), id=f"{k}#{i}", key=k) for i in range(per_key) for k in keys]


async def _receive(receiver: Receiver, want: int, rounds: int = 100) -> list[Delivery]:
    got: list[Delivery] = []
    for _ in range(rounds):
        if len(got) >= want:
            break
        got += await receiver.receive(100, 0.05)
    return got


async def _consume_all(receiver: Receiver, n: int, rounds: int = 400) -> list[Delivery]:
    """Receive and ack one at a time until ``n`` acked; the order they were handed out in."""
    done: list[Delivery] = []
    for _ in range(rounds):
        if len(done) >= n:
            break
        for d in await receiver.receive(100, 0.05):
            await d.ack()
            done.append(d)
    return done


def _in_order(deliveries: list[Delivery]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = defaultdict(list)
    for d in deliveries:
        key = d.record.key
        assert key is not None
        seen[key].append(int(d.record.id.rsplit("#", 1)[1]))
    return seen


async def test_a_key_is_handed_out_one_at_a_time_and_a_nack_comes_back_first(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter(**ORDERED)
    await bus.declare(QUEUE)
    await bus.send(QUEUE, [*_keyed(["a", "b"], 3), Record(body=b"u", id="u")])
    receiver = await bus.receiver(QUEUE, prefetch=100)
    first = await _receive(receiver, 3)
    assert sorted(d.record.id for d in first) == ["a#0", "b#0", "u"]  # one of each key; the unkeyed one too
    head = next(d for d in first if d.record.id == "a#0")
    await head.nack(delay=0.3)
    for d in first:
        if d is not head:
            await d.ack()
    nxt = await _receive(receiver, 1)
    assert [d.record.id for d in nxt] == ["b#1"]  # b goes on; a waits for its nacked head
    again = await _receive(receiver, 1)
    assert [(d.record.id, d.attempt) for d in again] == [("a#0", 2)]  # in place, counted, before a#1
    await receiver.close()


async def test_a_dead_receivers_partitions_are_taken_over_in_order_with_only_heads_counted(
    make_adapter: MakeAdapter,
) -> None:
    """A receiver that dies holding a key's head (and its key-mates behind it): after its lease expires another
    takes over, gets the head again as attempt 2, the rest as attempt 1, in order; 0 lost, 0 dup."""
    bus = await make_adapter(**ORDERED)
    await bus.declare(QUEUE)
    sent = _keyed([f"k{i}" for i in range(8)], 5)
    await bus.send(QUEUE, sent)
    dying = await bus.receiver(QUEUE, prefetch=100)
    heads = await _receive(dying, 8)
    assert sorted(d.record.id for d in heads) == sorted(f"k{i}#0" for i in range(8))
    # It dies: no ack, no close (its leases are left to expire).
    survivor = await (await make_adapter(**ORDERED)).receiver(QUEUE, prefetch=100)
    done = await _consume_all(survivor, len(sent))
    assert sorted(d.record.id for d in done) == sorted(r.id for r in sent)  # 40 received, 0 lost, 0 dup
    assert all(ids == list(range(5)) for ids in _in_order(done).values())
    assert {d.record.id: d.attempt for d in done if d.attempt != 1} == {f"k{i}#0": 2 for i in range(8)}
    await survivor.close()


async def test_receivers_share_the_partitions(make_adapter: MakeAdapter, raw: redis.asyncio.Redis) -> None:
    bus = await make_adapter(**ORDERED)
    await bus.declare(QUEUE)
    one, two = await bus.receiver(QUEUE, prefetch=10), await bus.receiver(QUEUE, prefetch=10)
    for _ in range(10):  # a few housekeeping rounds: the first takes all, then hands over what is beyond its share
        await asyncio.gather(one.receive(10, 0.1), two.receive(10, 0.1))
    owners = [await raw.get(f"{bus.options.prefix}:{{q:ordered}}:p{i}:lease:msgbus") for i in range(4)]
    assert None not in owners and len(set(owners)) == 2 and max(owners.count(o) for o in set(owners)) == 2
    await one.close()  # gives its leases up at once: the other takes them in its next round
    for _ in range(5):
        await two.receive(10, 0.1)
    assert len({await raw.get(f"{bus.options.prefix}:{{q:ordered}}:p{i}:lease:msgbus") for i in range(4)}) == 1
    await two.close()


async def test_hostile_keys_keep_their_order(make_adapter: MakeAdapter) -> None:
    keys = ["", " ", "k" * 100_000, "\x00\n\t", "ключ-🔑", "{q:x}", "a:lease:msgbus", "\ufffd\u200b"]
    bus = await make_adapter(**ORDERED)
    await bus.declare(QUEUE)
    sent = _keyed(keys, 4)
    await bus.send(QUEUE, sent)
    receiver = await bus.receiver(QUEUE, prefetch=100)
    done = await _consume_all(receiver, len(sent))
    assert sorted(d.record.id for d in done) == sorted(r.id for r in sent)
    assert _in_order(done) == {k: [0, 1, 2, 3] for k in keys}
    await receiver.close()


async def test_an_ordered_subscription_gets_keyed_and_unkeyed_publishes(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter(**ORDERED)
    sub = Endpoint("topic", "placed", "billing")
    await bus.declare(sub)
    await bus.send(Endpoint("topic", "placed"), [*_keyed(["x", "y"], 3), Record(body=b"u", id="u")])
    receiver = await bus.receiver(sub, prefetch=100)
    done = await _consume_all(receiver, 7)
    assert sorted(d.record.id for d in done) == sorted([*(r.id for r in _keyed(["x", "y"], 3)), "u"])
    assert _in_order([d for d in done if d.record.key is not None]) == {"x": [0, 1, 2], "y": [0, 1, 2]}
    await receiver.close()


_KILLED_CONSUMER = """
import asyncio, os, sys
import msgbus

async def main() -> None:
    async with msgbus.connect(os.environ["URL"]) as bus:
        async def handle(msg: msgbus.Message) -> None:
            await asyncio.sleep(0.002)
            print(msg.id, msg.attempt, flush=True)
        await bus.consumer(sys.argv[1]).run(handle, concurrency=16)

asyncio.run(main())
"""


async def test_a_consumer_process_killed_mid_partition_loses_nothing_and_order_holds(
    make_adapter: MakeAdapter, redis_url: str, prefix: str
) -> None:
    """SIGKILL a consumer process (run(concurrency=16)) while it handles keyed messages; a survivor takes its
    partitions over once the leases expire: every message handled, each key's messages in send order across the
    kill (only the one in a handler at the kill may be handled twice), 0 lost."""
    import msgbus

    options = "ordering=per_key&partitions=4&visibility_timeout=1&poll_interval=0.05"
    url = f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={prefix}&{options}"
    keys, per_key = 20, 30
    bus = await make_adapter(**ORDERED)
    await bus.declare(QUEUE)
    await bus.send(QUEUE, _keyed([f"k{i}" for i in range(keys)], per_key))
    env = {**os.environ, "URL": url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_CONSUMER, QUEUE.name, env=env, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    handled: list[str] = []
    while len(handled) < keys * per_key // 3:
        line = await proc.stdout.readline()
        assert line, "the consumer process ended early"
        handled.append(line.split()[0].decode())
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    # What the dead one handled (its last ones perhaps unacked), including what it printed after we stopped reading.
    before = handled + [line.split()[0].decode() for line in (await proc.stdout.read()).splitlines() if line]
    order: dict[str, list[int]] = defaultdict(list)
    async with msgbus.connect(url) as survivor_bus:
        done: set[str] = set()

        async def handle(msg: msgbus.Message[object]) -> None:
            key, i = msg.id.rsplit("#", 1)
            order[key].append(int(i))
            done.add(msg.id)

        consumer = survivor_bus.consumer(QUEUE.name)
        task = asyncio.ensure_future(consumer.run(handle, concurrency=16))
        async with asyncio.timeout(30):
            while len(done | set(before)) < keys * per_key:
                await asyncio.sleep(0.05)
        consumer.stop()
        await task
    assert len(done | set(before)) == keys * per_key  # 0 lost
    for key, got in order.items():
        assert got == sorted(got) and len(got) == len(set(got)), f"{key}: {got}"  # in order, each once
        dead = [int(h.rsplit("#", 1)[1]) for h in before if h.startswith(f"{key}#")]
        # The survivor starts at most one back: the dead one's last of the key may not have been acked.
        assert not dead or got[0] >= max(dead), f"{key}: dead one handled {dead}, survivor {got}"


async def test_three_consumers_at_concurrency_16_keep_each_keys_order_across_retries(
    make_adapter: MakeAdapter, redis_url: str, prefix: str
) -> None:
    """Issue 19's bar: several consumers, run(concurrency=16), injected failures: a key's message i+1 never reaches
    a handler before i succeeded, never two of a key in handlers at once; every message handled, 0 lost."""
    import msgbus

    url = f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={prefix}&ordering=per_key&poll_interval=0.05"
    keys, per_key = 40, 25
    next_i: dict[str, int] = dict.fromkeys((f"k{k}" for k in range(keys)), 0)
    busy: set[str] = set()
    violations: list[str] = []
    failed: set[str] = set()
    done: set[str] = set()

    async def handle(msg: msgbus.Message[object]) -> None:
        key, i = msg.id.rsplit("#", 1)
        if key in busy or int(i) != next_i[key]:
            violations.append(f"{msg.id} attempt {msg.attempt} while next is #{next_i[key]}, busy={key in busy}")
        busy.add(key)
        try:
            await asyncio.sleep(0.001)
            if int(i) % 7 == 3 and msg.id not in failed:
                failed.add(msg.id)
                raise RuntimeError("injected failure")
            next_i[key] = int(i) + 1
            done.add(msg.id)
        finally:
            busy.discard(key)

    buses = [msgbus.connect(url) for _ in range(3)]
    for bus in buses:
        await bus.open()
    sender = buses[0].producer(QUEUE.name)
    ids = [f"k{k}#{i}" for i in range(per_key) for k in range(keys)]
    for start in range(0, len(ids), 200):
        await sender.send_many(
            [msgbus.Outgoing(b"x", key=i.split("#")[0], message_id=i) for i in ids[start : start + 200]]
        )
    policy = msgbus.RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.05)
    consumers = [bus.consumer(QUEUE.name) for bus in buses]
    tasks = [asyncio.ensure_future(c.run(handle, concurrency=16, retry=policy)) for c in consumers]
    async with asyncio.timeout(60):
        while len(done) < len(ids) and len(violations) < 10:
            await asyncio.sleep(0.05)
    for c, task in zip(consumers, tasks, strict=True):
        c.stop()
        await task
    for bus in buses:
        await bus.close()
    assert not violations, violations[:5]
    assert done == set(ids)  # 1000 handled, 0 lost
    assert len(failed) == keys * (per_key // 7 + (1 if per_key % 7 > 3 else 0))  # every injected failure retried


async def test_more_receivers_than_partitions_stand_by_and_still_take_unkeyed(make_adapter: MakeAdapter) -> None:
    """Five receivers of a subscription with four partitions at room 1 (less than its two own streams): one holds no
    lease and still receives unkeyed messages; every keyed one arrives once."""
    bus = await make_adapter(**ORDERED)
    sub = Endpoint("topic", "t5", "s")
    await bus.declare(sub)
    receivers = [await bus.receiver(sub, prefetch=1) for _ in range(5)]
    for _ in range(6):
        await asyncio.gather(*(r.receive(1, 0.05) for r in receivers))
    await bus.send(
        Endpoint("topic", "t5"), [*_keyed(["a", "b", "c"], 2), *(Record(b"u", id=f"u{i}") for i in range(20))]
    )
    got: list[Delivery] = []
    for _ in range(200):
        if len(got) >= 26:
            break
        for batch in await asyncio.gather(*(r.receive(1, 0.02) for r in receivers)):
            for d in batch:
                await d.ack()
            got += batch
    assert sorted(d.record.id for d in got) == sorted(
        [*(r.id for r in _keyed(["a", "b", "c"], 2)), *(f"u{i}" for i in range(20))]
    )
    for r in receivers:
        await r.close()
