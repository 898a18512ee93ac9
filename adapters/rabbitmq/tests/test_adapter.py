"""The adapter SPI against a real RabbitMQ: exact counts, attempts, dead letters, delays, limits."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest

from msgbus.adapter import (
    HEADER_ATTEMPTS,
    HEADER_DEAD_LETTER_REASON,
    HEADER_DEAD_LETTER_SOURCE,
    Delivery,
    Endpoint,
    Receiver,
    Record,
)
from msgbus.errors import ClosedError, ConnectionLost, MessageTooLarge, PublishError, TopologyError
from msgbus_rabbitmq import RabbitMQAdapter

pytestmark = pytest.mark.integration


def _records(n: int, prefix: str = "m") -> list[Record]:
    return [
        # milliseconds: the resolution RabbitMQ keeps (timestamp_in_ms)
        Record(f"body-{i}".encode(), f"{prefix}-{i}", {"i": str(i)}, key=f"k{i % 3}", timestamp=round(time.time(), 3))
        for i in range(n)
    ]


async def _drain(receiver: Receiver, n: int, *, ack: bool = True, timeout: float = 10.0) -> list[Delivery]:
    """Receive until ``n`` deliveries arrived (or a receive times out), acking each when ``ack``."""
    got: list[Delivery] = []
    while len(got) < n:
        batch = await receiver.receive(n - len(got), timeout)
        if not batch:
            break
        if ack:
            await receiver.ack_many(batch)
        got.extend(batch)
    return got


async def _nothing_more(receiver: Receiver) -> None:
    assert await receiver.receive(10, 0.3) == []


async def test_queue_keeps_messages_sent_before_any_consumer_and_round_trips_them(
    adapter: RabbitMQAdapter, names: Callable[[str], str]
) -> None:
    ep = Endpoint("queue", names("q"))
    await adapter.declare(ep)
    sent = [*_records(200), Record(b"\x00\xff", "odd", {"h": "é ü"}, "", "corr", "application/x", 1.5)]
    for i in range(0, len(sent), 50):
        await adapter.send(ep, sent[i : i + 50])
    receiver = await adapter.receiver(ep, prefetch=50)
    got = await _drain(receiver, len(sent))
    await _nothing_more(receiver)
    await receiver.close()
    assert Counter(d.record.id for d in got) == Counter(r.id for r in sent)  # 201 sent, 201 received, 0 dup
    by_id = {d.record.id: d for d in got}
    assert all(by_id[r.id].record == r for r in sent)  # every field exactly as sent
    assert {d.attempt for d in got} == {1}


async def test_competing_consumers_split_the_queue(adapter: RabbitMQAdapter, names: Callable[[str], str]) -> None:
    ep = Endpoint("queue", names("q"))
    await adapter.declare(ep)
    one, two = await adapter.receiver(ep, prefetch=5), await adapter.receiver(ep, prefetch=5)
    sent = _records(100)
    await adapter.send(ep, sent)
    got: list[Delivery] = []
    seen = {id(one): 0, id(two): 0}
    while len(got) < 100:
        progressed = False
        for receiver in (one, two):
            batch = await receiver.receive(5, 0.2)
            await receiver.ack_many(batch)
            seen[id(receiver)] += len(batch)
            got.extend(batch)
            progressed |= bool(batch)
        if not progressed:
            break
    await one.close()
    await two.close()
    ids = Counter(d.record.id for d in got)
    assert len(ids) == 100 and sum(ids.values()) == 100  # 100 sent, 100 received, 0 dup
    assert min(seen.values()) > 0  # both took part (prefetch 5 each: neither can hold all 100)


async def test_each_subscription_gets_every_message(adapter: RabbitMQAdapter, names: Callable[[str], str]) -> None:
    topic = names("t")
    sub, s2 = Endpoint("topic", topic, "sub"), Endpoint("topic", topic, "s2")
    await adapter.declare(Endpoint("topic", topic))
    await adapter.send(Endpoint("topic", topic), _records(3, "before"))  # no subscription yet: not an error
    await adapter.declare(sub)
    await adapter.declare(s2)
    sent = _records(30)
    await adapter.send(Endpoint("topic", topic), sent)
    for ep in (sub, s2):
        receiver = await adapter.receiver(ep, prefetch=10)
        got = await _drain(receiver, 30)
        await _nothing_more(receiver)
        await receiver.close()
        assert Counter(d.record.id for d in got) == Counter(r.id for r in sent), ep


async def test_send_to_an_undeclared_queue_raises_publish_error(
    adapter: RabbitMQAdapter, names: Callable[[str], str]
) -> None:
    with pytest.raises(PublishError, match="NO_ROUTE"):
        await adapter.send(Endpoint("queue", names("missing")), _records(1))
    with pytest.raises(PublishError, match="NO_ROUTE"):  # a batch: the broker's answer, not retried
        await adapter.send(Endpoint("queue", names("missing")), _records(3))
    ep = Endpoint("queue", names("q"))  # the publish channel still works afterwards
    await adapter.declare(ep)
    await adapter.send(ep, _records(1))


async def test_verify_only_checks(make_adapter: Callable[..., RabbitMQAdapter], names: Callable[[str], str]) -> None:
    adapter = make_adapter()
    await adapter.open()
    try:
        ep = Endpoint("topic", names("t"), "sub")
        with pytest.raises(TopologyError, match="NOT_FOUND"):
            await adapter.declare(ep, create=False)
        await adapter.declare(ep)
        fresh = make_adapter()
        await fresh.open()
        await fresh.declare(ep, create=False)
        await fresh.close()
    finally:
        await adapter.close()


async def test_declaring_an_existing_queue_with_another_type_is_a_topology_error(
    make_adapter: Callable[..., RabbitMQAdapter], names: Callable[[str], str]
) -> None:
    ep = Endpoint("queue", names("q"))
    classic, quorum = make_adapter(queue_type="classic"), make_adapter()
    await classic.open()
    await quorum.open()
    try:
        await classic.declare(ep)
        with pytest.raises(TopologyError, match="PRECONDITION_FAILED"):
            await quorum.declare(ep)
    finally:
        await classic.close()
        await quorum.close()


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_attempts_count_nacks_delays_and_crashes_then_dead_letter_keeps_the_reason(
    make_adapter: Callable[..., RabbitMQAdapter], names: Callable[[str], str], queue_type: str
) -> None:
    adapter = make_adapter(queue_type=queue_type)
    await adapter.open()
    try:
        ep = Endpoint("queue", names("q"))
        await adapter.declare(ep)
        original = _records(1)[0]
        await adapter.send(ep, [original])
        receiver = await adapter.receiver(ep, prefetch=1)
        attempts = []
        (d,) = await _drain(receiver, 1, ack=False)
        attempts.append(d.attempt)
        await d.nack()
        (d,) = await _drain(receiver, 1, ack=False)
        attempts.append(d.attempt)
        await d.nack(delay=0.2)
        (d,) = await _drain(receiver, 1, ack=False)
        attempts.append(d.attempt)
        await receiver.close()  # a consumer dying with the message unacked
        receiver = await adapter.receiver(ep, prefetch=1)
        (d,) = await _drain(receiver, 1, ack=False)
        attempts.append(d.attempt)
        assert d.record == original  # id, headers, key, timestamp survive every re-publish
        await d.dead_letter("ValueError: bad order")
        await _nothing_more(receiver)
        await receiver.close()
        assert attempts == [1, 2, 3, 4]

        dlq = await adapter.receiver(Endpoint("queue", ep.name, dead_letter=True), prefetch=5)
        (dead,) = await _drain(dlq, 1)
        await _nothing_more(dlq)
        await dlq.close()
        assert dead.record.body == original.body and dead.record.id == original.id
        assert dead.record.headers == {
            **original.headers,
            HEADER_DEAD_LETTER_REASON: "ValueError: bad order",
            HEADER_ATTEMPTS: "4",
            HEADER_DEAD_LETTER_SOURCE: f"queue:{ep.name}",
        }
    finally:
        await adapter.close()


async def test_prefetch_bounds_unsettled_deliveries(adapter: RabbitMQAdapter, names: Callable[[str], str]) -> None:
    ep = Endpoint("queue", names("q"))
    await adapter.declare(ep)
    await adapter.send(ep, _records(20))
    receiver = await adapter.receiver(ep, prefetch=5)
    first = await _drain(receiver, 5, ack=False)
    await _nothing_more(receiver)  # 5 unacked: the broker sends no more credit
    await receiver.ack_many(first)
    rest = await _drain(receiver, 15)
    await receiver.close()
    assert len({d.record.id for d in first + rest}) == 20


async def test_closing_a_receiver_acks_nothing(adapter: RabbitMQAdapter, names: Callable[[str], str]) -> None:
    ep = Endpoint("queue", names("q"))
    await adapter.declare(ep)
    await adapter.send(ep, _records(10))
    receiver = await adapter.receiver(ep, prefetch=10)
    held = await _drain(receiver, 10, ack=False)
    await receiver.close()
    with pytest.raises(ClosedError):
        await receiver.receive(1, 0.1)
    again = await adapter.receiver(ep, prefetch=10)
    back = await _drain(again, 10)
    await again.close()
    assert sorted(d.record.id for d in back) == sorted(d.record.id for d in held)  # 10 back, 0 lost
    assert {d.attempt for d in back} == {2}


async def test_delayed_send_holds_back_without_blocking_others(
    adapter: RabbitMQAdapter, names: Callable[[str], str]
) -> None:
    ep, topic = Endpoint("queue", names("q")), names("t")
    sub = Endpoint("topic", topic, "sub")
    await adapter.declare(ep)
    await adapter.declare(sub)
    await adapter.send(ep, [Record(b"later", "later")], delay=0.5)
    await adapter.send(Endpoint("topic", topic), [Record(b"later", "t-later")], delay=0.5)
    await adapter.send(ep, [Record(b"now", "now")])
    receiver = await adapter.receiver(ep, prefetch=10)
    order = [d.record.id for d in await _drain(receiver, 2)]
    await receiver.close()
    sub_receiver = await adapter.receiver(sub, prefetch=10)
    (published,) = await _drain(sub_receiver, 1)
    await sub_receiver.close()
    assert order == ["now", "later"]
    assert published.record.id == "t-later" and published.attempt == 1


async def test_oversized_messages_are_refused_before_sending(
    make_adapter: Callable[..., RabbitMQAdapter], names: Callable[[str], str]
) -> None:
    adapter = make_adapter(max_message_size=1024)
    await adapter.open()
    try:
        assert adapter.capabilities.max_message_size == 1024
        ep = Endpoint("queue", names("q"))
        await adapter.declare(ep)
        with pytest.raises(MessageTooLarge):
            await adapter.send(ep, [Record(b"x", "ok"), Record(b"x" * 1025, "big")])
        receiver = await adapter.receiver(ep, prefetch=1)
        await _nothing_more(receiver)  # nothing of the batch was sent
        await receiver.close()
    finally:
        await adapter.close()


async def test_a_receiver_on_a_missing_queue_is_a_topology_error_and_leaves_nothing_open(
    adapter: RabbitMQAdapter, names: Callable[[str], str]
) -> None:
    with pytest.raises(TopologyError, match="NOT_FOUND") as caught:
        await adapter.receiver(Endpoint("queue", names("q")), prefetch=5)
    assert "guest:guest" not in str(caught.value)
    assert not adapter._receivers  # its connection is closed, no reconnect loop left behind


async def test_closing_the_adapter_closes_its_receivers(
    make_adapter: Callable[..., RabbitMQAdapter], names: Callable[[str], str]
) -> None:
    first = make_adapter()
    await first.open()
    ep = Endpoint("queue", names("q"))
    await first.declare(ep)
    await first.send(ep, _records(6))
    receiver = await first.receiver(ep, prefetch=6)
    held = await _drain(receiver, 6, ack=False)
    await first.close()
    with pytest.raises(ClosedError):
        await receiver.receive(1, 0.1)
    second = make_adapter()
    await second.open()
    try:
        again = await second.receiver(ep, prefetch=6)
        back = await _drain(again, 6)
        await again.close()
    finally:
        await second.close()
    assert sorted(d.record.id for d in back) == sorted(d.record.id for d in held)  # 6 back, 0 lost


async def test_a_receiver_whose_connection_drops_reconnects_and_gets_the_unacked_back(
    adapter: RabbitMQAdapter, names: Callable[[str], str]
) -> None:
    ep = Endpoint("queue", names("q"))
    await adapter.declare(ep)
    await adapter.send(ep, _records(10))
    receiver = await adapter.receiver(ep, prefetch=5)
    held = await _drain(receiver, 5, ack=False)
    conn = receiver._conn  # type: ignore[attr-defined]
    conn.close()  # as if the network dropped it: the broker puts the 5 unacked back
    with pytest.raises(ConnectionLost):
        await held[0].ack()  # its channel is gone: the ack cannot count, and says so
    await held[1].nack()  # a nack of a lost delivery is a no-op: the broker already put it back
    got = await _drain(receiver, 10, timeout=15.0)
    await receiver.close()
    ids = Counter(d.record.id for d in got)
    assert sorted(ids) == sorted(r.id for r in _records(10))  # 10 sent, 10 received after the drop, 0 lost
    assert set(ids.values()) == {1}
    assert {d.attempt for d in got if d.record.id in {h.record.id for h in held}} == {2}


async def test_the_quorum_queues_own_delivery_limit_dead_letters_past_it(
    make_adapter: Callable[..., RabbitMQAdapter], names: Callable[[str], str]
) -> None:
    """The backstop: returns counted by the broker, past x-delivery-limit it dead-letters by itself."""
    adapter = make_adapter(delivery_limit=2)
    await adapter.open()
    try:
        ep = Endpoint("queue", names("q"))
        await adapter.declare(ep)
        await adapter.send(ep, _records(1))
        attempts = []
        for _ in range(3):  # each receiver closes holding it, as a consumer that dies would
            receiver = await adapter.receiver(ep, prefetch=1)
            attempts += [d.attempt for d in await _drain(receiver, 1, ack=False, timeout=5)]
            await receiver.close()
        dead = await adapter.receiver(Endpoint("queue", ep.name, dead_letter=True), prefetch=5)
        (gone,) = await _drain(dead, 1, timeout=5)
        main = await adapter.receiver(ep, prefetch=5)
        await _nothing_more(main)
    finally:
        await adapter.close()
    assert attempts == [1, 2, 3] and adapter.capabilities.native_delivery_limit == 2
    assert gone.record.id == "m-0" and HEADER_DEAD_LETTER_REASON not in gone.record.headers  # the broker's: no reason


async def test_a_queue_made_without_a_delivery_limit_is_kept_as_it_is(
    adapter: RabbitMQAdapter, names: Callable[[str], str], broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    name = names("q")
    connection = await aio_pika.connect(broker.url)
    try:  # as an older msgbus declared it
        channel = await connection.channel()
        arguments = {"x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{name}.dlq"}
        await channel.declare_queue(name, durable=True, arguments=arguments)
    finally:
        await connection.close()
    ep = Endpoint("queue", name)
    await adapter.declare(ep)  # no PRECONDITION_FAILED: used as it is, with a warning
    await adapter.send(ep, _records(3))
    receiver = await adapter.receiver(ep, prefetch=5)
    assert len(await _drain(receiver, 3)) == 3
    await receiver.close()
    assert "exists without x-delivery-limit" in caplog.text


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_what_a_stopping_consumer_gives_back_is_counted_once(
    make_adapter: Callable[..., RabbitMQAdapter], names: Callable[[str], str], queue_type: str
) -> None:
    """``run()`` stopping: ``release_many`` gives back the core's buffer, then ``release`` what the broker pushed and
    ``receive`` did not return. A message given back once comes back as attempt 2 (quorum: the broker counts the
    return; classic: the redelivered flag, or the copy a nack makes), not 3 after being pushed straight back here."""
    adapter = make_adapter(queue_type=queue_type)
    await adapter.open()
    try:
        ep = Endpoint("queue", names("q"))
        await adapter.declare(ep)
        sent = _records(10)
        await adapter.send(ep, sent)
        receiver = await adapter.receiver(ep, prefetch=10)
        taken = await _drain(receiver, 4, ack=False)
        async with asyncio.timeout(10):
            while len(receiver._buffer) < 10 - len(taken):  # type: ignore[attr-defined]  # pushed, not received
                await asyncio.sleep(0.01)
        await receiver.release_many(taken)
        await asyncio.sleep(0.3)  # time for the broker to push the returned messages to a consumer still there
        await receiver.release()
        await receiver.close()
        other = await adapter.receiver(ep, prefetch=10)
        back = await _drain(other, 10)
        await _nothing_more(other)
        await other.close()
        assert sorted(d.record.id for d in back) == sorted(r.id for r in sent)  # 10 sent, 10 back, 0 lost, 0 dup
        assert [d.attempt for d in back] == [2] * 10
    finally:
        await adapter.close()
