"""The memory:// adapter at the SPI level: delivery semantics with exact counts, no mocks."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from msgbus import _memory
from msgbus._url import parse_url
from msgbus.adapter import (
    HEADER_ATTEMPTS,
    HEADER_DEAD_LETTER_REASON,
    HEADER_DEAD_LETTER_SOURCE,
    Adapter,
    Delivery,
    Endpoint,
    Receiver,
    Record,
)
from msgbus.errors import ClosedError, ConfigError, MessageTooLarge, TopologyError

_names = itertools.count()
Q = Endpoint("queue", "work")
DLQ = Endpoint("queue", "work", dead_letter=True)


def make(namespace: str, **options: object) -> Adapter:
    url = parse_url(f"memory://{namespace}")
    reader = url.reader(options)
    adapter = _memory.create(url, reader)
    reader.finish()
    return adapter


@pytest.fixture
def namespace() -> str:
    """A fresh namespace per test, so tests never see each other's messages."""
    return f"t{next(_names)}"


@pytest.fixture
async def adapter(namespace: str) -> AsyncIterator[Adapter]:
    a = make(namespace, visibility_timeout=0.5)
    await a.open()
    yield a
    await a.close()
    _memory.reset(namespace)


def rec(i: int, key: str | None = None, **headers: str) -> Record:
    return Record(body=str(i).encode(), id=f"m{i}", headers=headers, key=key)


def bodies(ds: list[Delivery]) -> list[int]:
    return [int(d.record.body) for d in ds]


async def drain(r: Receiver, n: int, timeout: float = 2.0) -> list[Delivery]:
    """Receive until ``n`` deliveries arrived (or a receive times out)."""
    out: list[Delivery] = []
    while len(out) < n:
        got = await r.receive(n - len(out), timeout)
        if not got:
            break
        out.extend(got)
    return out


async def test_fifo_and_ack_removes(adapter: Adapter) -> None:
    await adapter.declare(Q)
    await adapter.send(Q, [rec(i) for i in range(10)])
    r = await adapter.receiver(Q, prefetch=100)
    got = await r.receive(100, 1.0)
    assert bodies(got) == list(range(10))
    assert all(d.attempt == 1 for d in got)
    await r.ack_many(got)
    assert await r.receive(10, 0.05) == []


async def test_nack_redelivers_same_id_attempt_plus_one_in_place(adapter: Adapter) -> None:
    await adapter.send(Q, [rec(i) for i in range(3)])
    r = await adapter.receiver(Q, prefetch=10)
    first = await r.receive(1, 1.0)
    assert bodies(first) == [0]
    await first[0].nack()
    again = await r.receive(10, 1.0)
    assert bodies(again) == [0, 1, 2]  # a redelivery keeps its original place
    assert again[0].record.id == "m0"
    assert [d.attempt for d in again] == [2, 1, 1]


async def test_a_stops_hand_back_counts_no_attempt_and_a_stale_handle_is_harmless(adapter: Adapter) -> None:
    """``release_many`` (a stopping consumer's buffer): back at once, in place, with the attempt each had; a
    released handle settles nothing, and a nack after it counts from the attempt the message had."""
    await adapter.send(Q, [rec(i) for i in range(3)])
    r = await adapter.receiver(Q, prefetch=10)
    first = await r.receive(1, 1.0)
    await first[0].nack()
    held = await r.receive(10, 1.0)
    assert [(d.record.id, d.attempt) for d in held] == [("m0", 2), ("m1", 1), ("m2", 1)]
    await r.release_many(held)
    for d in held:
        await d.ack()  # already given back: a stale handle
    again = await r.receive(10, 1.0)
    assert [(d.record.id, d.attempt) for d in again] == [("m0", 2), ("m1", 1), ("m2", 1)]
    await again[0].nack()
    (third,) = await r.receive(1, 1.0)
    assert (third.record.id, third.attempt) == ("m0", 3)


async def test_delayed_nack_holds_back(adapter: Adapter) -> None:
    await adapter.send(Q, [rec(0)])
    r = await adapter.receiver(Q, prefetch=10)
    (d,) = await r.receive(1, 1.0)
    await d.nack(delay=0.3)
    assert await r.receive(1, 0.05) == []
    (d2,) = await r.receive(1, 2.0)  # woken by its own deadline, not by polling
    assert (d2.record.id, d2.attempt) == ("m0", 2)


async def test_lease_expiry_redelivers_to_another_receiver(adapter: Adapter) -> None:
    await adapter.send(Q, [rec(0)])
    crashed = await adapter.receiver(Q, prefetch=10)
    (d,) = await crashed.receive(1, 1.0)
    await crashed.close()  # a consumer crash: nothing released, the lease must run out
    other = await adapter.receiver(Q, prefetch=10)
    assert await other.receive(1, 0.05) == []
    (d2,) = await other.receive(1, 2.0)
    assert (d2.record.id, d2.attempt) == ("m0", 2)
    await d.ack()  # stale handle: must not touch the new lease
    await d2.nack()
    (d3,) = await other.receive(1, 1.0)
    assert d3.attempt == 3
    await d3.ack()
    assert await other.receive(1, 0.3) == []


async def test_extend_keeps_the_lease(adapter: Adapter) -> None:
    await adapter.send(Q, [rec(0)])
    r = await adapter.receiver(Q, prefetch=10)
    other = await adapter.receiver(Q, prefetch=10)
    (d,) = await r.receive(1, 1.0)
    for _ in range(4):  # 0.6 s in total, longer than the 0.5 s lease
        await d.extend(1.0)
        assert await other.receive(1, 0.15) == []
    await d.ack()
    assert await other.receive(1, 0.5) == []


async def test_delayed_send(adapter: Adapter) -> None:
    await adapter.send(Q, [rec(0)], delay=0.3)
    await adapter.send(Q, [rec(1)])
    r = await adapter.receiver(Q, prefetch=10)
    now = await r.receive(10, 1.0)
    assert bodies(now) == [1]
    await r.ack_many(now)
    assert await r.receive(10, 0.05) == []
    assert bodies(await r.receive(10, 2.0)) == [0]


async def test_waiter_is_woken_by_a_send(adapter: Adapter) -> None:
    r = await adapter.receiver(Q, prefetch=10)
    task = asyncio.create_task(r.receive(10, 30.0))
    await asyncio.sleep(0.01)
    assert not task.done()
    await adapter.send(Q, [rec(7)])
    got = await asyncio.wait_for(task, 5.0)
    assert bodies(got) == [7]


async def test_waiter_is_woken_from_another_thread(adapter: Adapter, namespace: str) -> None:
    r = await adapter.receiver(Q, prefetch=10)
    task = asyncio.create_task(r.receive(10, 30.0))
    await asyncio.sleep(0.01)

    def other_loop() -> None:  # what the sync facade does: the core on a background loop
        async def send() -> None:
            a = make(namespace)
            await a.send(Q, [rec(9)])

        asyncio.run(send())

    t = threading.Thread(target=other_loop)
    t.start()
    got = await asyncio.wait_for(task, 5.0)
    t.join()
    assert bodies(got) == [9]


async def test_dead_letter_keeps_body_and_headers_and_says_why(adapter: Adapter) -> None:
    await adapter.send(Q, [rec(0, trace="abc")])
    r = await adapter.receiver(Q, prefetch=10)
    (d,) = await r.receive(1, 1.0)
    await d.nack()
    (d,) = await r.receive(1, 1.0)
    await d.dead_letter("bad order")
    assert await r.receive(1, 0.05) == []
    dlr = await adapter.receiver(DLQ, prefetch=10)
    (dl,) = await dlr.receive(1, 1.0)
    assert dl.record.body == b"0" and dl.record.id == "m0"
    assert dict(dl.record.headers) == {
        "trace": "abc",
        HEADER_DEAD_LETTER_REASON: "bad order",
        HEADER_ATTEMPTS: "2",
        HEADER_DEAD_LETTER_SOURCE: "queue:work",
    }
    # A dead letter dead-lettered again goes to the end of the same destination.
    await adapter.send(DLQ, [rec(1)])
    await dl.dead_letter("still bad")
    assert bodies(await dlr.receive(10, 1.0)) == [1, 0]


async def test_fan_out_to_subscriptions_existing_at_publish(adapter: Adapter) -> None:
    topic = Endpoint("topic", "placed")
    a, b, late = (Endpoint("topic", "placed", subscription=s) for s in ("a", "b", "late"))
    await adapter.send(topic, [rec(0)])  # no subscription yet: dropped
    await adapter.declare(a)
    await adapter.declare(b)
    await adapter.send(topic, [rec(i) for i in range(1, 4)])
    await adapter.declare(late)
    await adapter.send(topic, [rec(4)])
    results = {}
    for sub in (a, b, late):
        r = await adapter.receiver(sub, prefetch=100)
        results[sub.subscription] = bodies(await r.receive(100, 1.0))
        assert await r.receive(100, 0.02) == []
    assert results == {"a": [1, 2, 3, 4], "b": [1, 2, 3, 4], "late": [4]}


async def test_subscription_dead_letters_are_separate(adapter: Adapter) -> None:
    a, b = (Endpoint("topic", "t", subscription=s) for s in ("a", "b"))
    await adapter.declare(a)
    await adapter.declare(b)
    await adapter.send(Endpoint("topic", "t"), [rec(0)])
    ra = await adapter.receiver(a, prefetch=10)
    (d,) = await ra.receive(1, 1.0)
    await d.dead_letter("x")
    dla = await adapter.receiver(Endpoint("topic", "t", subscription="a", dead_letter=True), prefetch=10)
    dlb = await adapter.receiver(Endpoint("topic", "t", subscription="b", dead_letter=True), prefetch=10)
    (dl,) = await dla.receive(1, 1.0)
    assert dl.record.headers[HEADER_DEAD_LETTER_SOURCE] == "topic:t/a"
    assert await dlb.receive(1, 0.02) == []


async def test_per_key_order_one_at_a_time_across_nacks(adapter: Adapter) -> None:
    await adapter.send(Q, [rec(0, "k"), rec(1, "k"), rec(2, None), rec(3, "j"), rec(4, "k")])
    r = await adapter.receiver(Q, prefetch=100)
    got = await r.receive(100, 1.0)
    assert bodies(got) == [0, 2, 3]  # 1 and 4 wait for 0 (same key); unkeyed and other keys go
    await got[0].nack()
    (again,) = await r.receive(100, 1.0)
    assert (bodies([again]), again.attempt) == ([0], 2)
    assert await r.receive(100, 0.02) == []  # 1 and 4 still wait
    await again.ack()
    (one,) = await r.receive(100, 1.0)
    assert bodies([one]) == [1]
    await one.ack()
    assert bodies(await r.receive(100, 1.0)) == [4]


async def test_per_key_order_holds_through_lease_expiry_and_delay(adapter: Adapter) -> None:
    await adapter.send(Q, [rec(0, "k")], delay=0.2)
    await adapter.send(Q, [rec(1, "k")])
    r = await adapter.receiver(Q, prefetch=100)
    assert await r.receive(10, 0.05) == []  # 1 waits behind the delayed 0
    (d,) = await r.receive(10, 2.0)
    assert bodies([d]) == [0]
    (d,) = await r.receive(10, 2.0)  # lease of 0 expires: 0 again, never 1
    assert (bodies([d]), d.attempt) == ([0], 2)
    await d.ack()
    assert bodies(await r.receive(10, 1.0)) == [1]


async def test_per_key_order_with_competing_receivers_exact(adapter: Adapter) -> None:
    keys, per_key = 20, 50
    await adapter.send(Q, [rec(i, f"k{i % keys}") for i in range(keys * per_key)])
    receivers = [await adapter.receiver(Q, prefetch=8) for _ in range(4)]
    seen: dict[str, list[int]] = {}
    in_flight: set[str] = set()

    async def work(r: Receiver) -> None:
        while True:
            got = await r.receive(8, 0.1)
            if not got:
                return
            for d in got:
                key = d.record.key
                assert key is not None and key not in in_flight
                in_flight.add(key)
            await asyncio.sleep(0)
            for d in got:
                key = d.record.key
                assert key is not None
                in_flight.discard(key)
                if int(d.record.body) % 7 == 0 and d.attempt == 1:
                    await d.nack()
                else:
                    seen.setdefault(key, []).append(int(d.record.body))
                    await d.ack()

    await asyncio.gather(*(work(r) for r in receivers))
    assert sum(len(v) for v in seen.values()) == keys * per_key
    for k, got in seen.items():
        assert got == sorted(got), k
        assert len(got) == len(set(got)) == per_key


async def test_receive_returns_what_it_is_asked_for(adapter: Adapter) -> None:
    await adapter.send(Q, [rec(i) for i in range(10)])
    r = await adapter.receiver(Q, prefetch=3)
    got = await r.receive(3, 1.0)
    assert bodies(got) == [0, 1, 2]
    # No count of its own (the consumer's inbox keeps the prefetch limit): the rest, though 3 are unsettled.
    assert bodies(await r.receive(100, 1.0)) == list(range(3, 10))
    assert await r.receive(100, 0.02) == []
    waiting = asyncio.create_task(r.receive(100, 30.0))  # empty: woken by a nack, not a timeout
    await asyncio.sleep(0.01)
    await got[1].nack()
    assert bodies(await asyncio.wait_for(waiting, 5.0)) == [1]


async def test_verify_mode_raises_topology_error(adapter: Adapter) -> None:
    with pytest.raises(TopologyError):
        await adapter.declare(Q, create=False)
    with pytest.raises(TopologyError):
        await adapter.declare(Endpoint("topic", "t", subscription="s"), create=False)
    await adapter.declare(Endpoint("topic", "t"))
    with pytest.raises(TopologyError):
        await adapter.declare(Endpoint("topic", "t", subscription="s"), create=False)
    await adapter.declare(Q)
    await adapter.declare(Q, create=False)
    await adapter.declare(DLQ, create=False)


async def test_namespaces_are_isolated_and_shared_by_name(namespace: str) -> None:
    one, same, other = make(namespace), make(namespace), make(namespace + "-other")
    await one.send(Q, [rec(1)])
    assert await (await other.receiver(Q, 10)).receive(10, 0.02) == []
    assert bodies(await (await same.receiver(Q, 10)).receive(10, 1.0)) == [1]
    _memory.reset(namespace)
    assert await (await make(namespace).receiver(Q, 10)).receive(10, 0.02) == []


async def test_too_large_is_refused_whole_batch(namespace: str) -> None:
    a = make(namespace, max_message_size=100)
    assert a.capabilities.max_message_size == 100
    with pytest.raises(MessageTooLarge):
        await a.send(Q, [rec(0), Record(body=b"x" * 200, id="big")])
    assert await (await a.receiver(Q, 10)).receive(10, 0.02) == []


def test_options_and_capabilities() -> None:
    a = make("opts", visibility_timeout=2.5)
    caps = a.capabilities
    assert (caps.ordering, caps.lock_duration, caps.persistence, caps.cross_process) == ("per_key", 2.5, "none", False)
    assert caps.delayed_delivery and caps.delayed_nack and caps.native_dead_letter and caps.lock_extension
    with pytest.raises(ConfigError):
        make("opts", visibility_timeout="soon")
    with pytest.raises(ConfigError, match="unknown option"):
        make("opts", colour="blue")
    with pytest.raises(ConfigError):
        _memory.create(parse_url("memory://ns/path"), parse_url("memory://").reader())


async def test_closed_receiver_and_adapter(adapter: Adapter) -> None:
    r = await adapter.receiver(Q, 10)
    pending = asyncio.create_task(r.receive(10, 30.0))
    await asyncio.sleep(0.01)
    await r.close()
    assert await asyncio.wait_for(pending, 5.0) == []
    with pytest.raises(ClosedError):
        await r.receive(1, 0)
    await adapter.close()
    with pytest.raises(ClosedError):
        await adapter.send(Q, [rec(0)])


async def test_exact_counts_competing_receivers_with_nacks(adapter: Adapter) -> None:
    n = 5000
    for start in range(0, n, 500):
        await adapter.send(Q, [rec(i) for i in range(start, start + 500)])
    acked: Counter[str] = Counter()

    async def work(r: Receiver) -> None:
        while True:
            got = await r.receive(64, 0.1)
            if not got:
                return
            ok = []
            for d in got:
                if int(d.record.body) % 10 == 0 and d.attempt == 1:
                    await d.nack()
                else:
                    ok.append(d)
                    acked[d.record.id] += 1
            await r.ack_many(ok)

    receivers = [await adapter.receiver(Q, prefetch=128) for _ in range(4)]
    await asyncio.gather(*(work(r) for r in receivers))
    assert len(acked) == n  # 0 lost
    assert set(acked.values()) == {1}  # 0 duplicates


async def test_stale_settles_change_nothing(adapter: Adapter) -> None:
    await adapter.send(Q, [rec(0)])
    r = await adapter.receiver(Q, prefetch=10)
    (old,) = await r.receive(1, 1.0)
    (new,) = await r.receive(1, 2.0)  # the old lease ran out; this is the same message again
    assert (new.record.id, new.attempt) == ("m0", 2)
    await old.nack()
    await old.dead_letter("stale")
    await old.extend(0.01)
    await old.ack()
    assert await r.receive(1, 0.05) == []  # still leased to ``new``, nothing dead-lettered
    assert await (await adapter.receiver(DLQ, 10)).receive(1, 0.02) == []
    await new.ack()
    assert await r.receive(1, 0.6) == []


async def test_lease_bookkeeping_stays_bounded(adapter: Adapter, namespace: str) -> None:
    r = await adapter.receiver(Q, prefetch=100)
    for start in range(0, 5000, 100):
        await adapter.send(Q, [rec(i) for i in range(start, start + 100)])
        got = await r.receive(100, 1.0)
        assert len(got) == 100
        for d in got:
            await d.ack()
    store = _memory._namespaces[namespace].queues["work"]
    assert (store.count, store.leased) == (0, 0)
    assert store._lease_refs <= 1024 + 100  # acked messages are not kept alive until their deadline
