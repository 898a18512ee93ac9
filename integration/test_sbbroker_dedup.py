"""The Service Bus test broker's duplicate detection, driven by the azure-servicebus SDK (what it sends is what is
checked): a message id seen within the entity's window is accepted and dropped, per entity, per partition key on
a partitioned entity; the history survives a kill. Entities get RequiresDuplicateDetection from the broker's
configuration by name (``integration/_servicebus.py``: ``dd-*`` 600 s, ``ddw-*`` 2 s, ``ddp-*`` partitioned).
The adapter's use of it is proved by the contract suite with ``duplicate_detection=true``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from azure.servicebus import ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient
from hypothesis import given, settings
from hypothesis import strategies as st
from proton import Message

import msgbus
from integration.brokers import Endpoint
from integration.sbbroker.store import MAX_MESSAGE_ID, Store
from integration.test_sbbroker_sessions import client

__all__ = ["client"]  # the fixture, shared with the sessions' tests

pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:unclosed:ResourceWarning"),
]


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def _bodies(client: ServiceBusClient, queue: str, subscription: str | None = None) -> list[str]:
    """Every message waiting on the queue (or subscription), received and completed, as body text."""
    receiver = (
        client.get_subscription_receiver(queue, subscription) if subscription else client.get_queue_receiver(queue)
    )
    out: list[str] = []
    async with receiver:
        while got := await receiver.receive_messages(max_message_count=50, max_wait_time=0.5):
            for message in got:
                out.append(str(message))
                await receiver.complete_message(message)
    return out


def _message(body: str, message_id: str, **kwargs: str) -> ServiceBusMessage:
    return ServiceBusMessage(body, message_id=message_id, **kwargs)


async def test_a_repeated_message_id_is_accepted_and_dropped_only_on_an_entity_that_requires_it(
    client: ServiceBusClient,
) -> None:
    for queue, expected in ((_name("dd"), ["a1", "b1", "c1"]), (_name("plain"), ["a1", "b1", "a2", "a3", "b2", "c1"])):
        async with client.get_queue_sender(queue) as sender:
            # A repeat in the same batch, then the whole send retried, one by one and scheduled.
            await sender.send_messages([_message("a1", "a"), _message("b1", "b"), _message("a2", "a")])
            await sender.send_messages(_message("a3", "a"))
            await sender.schedule_messages([_message("b2", "b")], datetime.now(UTC))
            await sender.send_messages(_message("c1", "c"))  # a new id still goes through
        await asyncio.sleep(0.3)  # the scheduled one, had it been kept, is due now
        assert sorted(await _bodies(client, queue)) == sorted(expected), queue


async def test_the_window_runs_from_the_first_send_and_a_repeat_does_not_extend_it(client: ServiceBusClient) -> None:
    queue = _name("ddw")  # a 2 s window
    async with client.get_queue_sender(queue) as sender:
        await sender.send_messages(_message("first", "x"))
        start = time.monotonic()
        await asyncio.sleep(1.0)
        await sender.send_messages(_message("inside the window", "x"))
        await asyncio.sleep(max(0.0, start + 2.5 - time.monotonic()))
        await sender.send_messages(_message("after the window", "x"))  # 2.5 s after the first, 1.5 s after the repeat
    assert await _bodies(client, queue) == ["first", "after the window"]


async def test_a_topic_drops_a_repeated_publish_for_every_subscription(client: ServiceBusClient) -> None:
    topic = _name("dd")
    for subscription in ("s1", "s2"):  # subscriptions exist before the publishes
        async with client.get_subscription_receiver(topic, subscription):
            pass
    async with client.get_topic_sender(topic) as sender:
        for body in ("p1", "p2"):
            await sender.send_messages(_message(body, "same"))
    assert [await _bodies(client, topic, s) for s in ("s1", "s2")] == [["p1"], ["p1"]]


async def test_partitioned_entities_detect_per_partition_key_others_per_entity(client: ServiceBusClient) -> None:
    for queue, expected in ((_name("ddp"), ["k1", "k2"]), (_name("dd"), ["k1"])):
        async with client.get_queue_sender(queue) as sender:
            for body, key in (("k1", "one"), ("k2", "two"), ("k1 again", "one")):
                await sender.send_messages(_message(body, "id", partition_key=key))
        assert sorted(await _bodies(client, queue)) == expected, queue


async def test_message_ids_at_the_limits(client: ServiceBusClient) -> None:
    queue = _name("dd")
    longest = "x" * MAX_MESSAGE_ID
    async with client.get_queue_sender(queue) as sender:
        await sender.send_messages([_message("long", longest), _message("long again", longest)])
        # The SDK sends no empty id: it puts a new uuid in its place, so "repeats" of "" are all kept (an empty id
        # sent over raw AMQP is refused: see the store's test below).
        await sender.send_messages([_message("empty", ""), _message("empty again", "")])
        with pytest.raises(ValueError, match="128"):  # the SDK refuses more than 128 characters itself
            await sender.send_messages(_message("too long", longest + "x"))
    assert sorted(await _bodies(client, queue)) == ["empty", "empty again", "long"]


async def _take(consumer: msgbus.Consumer[Any], n: int) -> list[msgbus.Message[Any]]:
    """``n`` messages (or what came within 10 s), then whatever follows within a second: a repeat would."""
    got: list[msgbus.Message[Any]] = []
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        got += await consumer.receive(10, timeout=1)
    return got + await consumer.receive(10, timeout=1)


async def test_the_adapter_with_duplicate_detection_keeps_ids_and_resends_that_are_no_repeats(
    broker_url: Callable[[str], Endpoint],
) -> None:
    """With ``duplicate_detection=true`` msgbus sends ``dedup_key`` as the MessageId: ids the service cannot hold
    round-trip (carried beside it), and a delayed nack's copy and a redrive, new sends of the same id, are kept."""
    url = broker_url("servicebus").url + "&duplicate_detection=true"
    queue = _name("dd")
    ids = ["plain", "ключ", "z" * 200]
    async with msgbus.connect(url) as bus:
        assert bus.capabilities.dedup_window == 600
        producer, consumer = bus.producer(queue), bus.consumer(queue)
        for _ in range(2):
            await producer.send_many([msgbus.Outgoing(i, message_id=i) for i in ids])
        first = await _take(consumer, len(ids))
        assert sorted(m.id for m in first) == sorted(ids)
        for m in first:
            await m.nack(delay=0.5)  # a scheduled copy, within the window
        again = await _take(consumer, len(ids))
        assert sorted((m.id, m.attempt) for m in again) == sorted((i, 2) for i in ids)
        for m in again:
            await m.reject("to redrive")
        redriven = await bus.redrive(queue, idle=0.5)
        assert sorted(redriven.moved) == sorted(ids)
        back = await _take(consumer, len(ids))
        assert sorted(m.id for m in back) == sorted(ids)
        for m in back:
            await m.ack()
        assert await consumer.receive(10, timeout=1) == []


# --- the store, without AMQP ---


def _raw(message_id: str | None, body: str = "") -> bytes:
    return bytes(Message(id=message_id, body=body).encode())


def _store(path: Path, window: float = 600.0) -> Store:
    store = Store(30, duplicate_detection={"dd-*": window, "*": 0.0})
    store.open(path)
    return store


def test_the_history_survives_a_kill_and_a_graceful_stop(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    store = _store(state)
    queue = store.entity("dd-q", "queue")
    assert not store.duplicate(queue, _raw("a")) and store.duplicate(queue, _raw("a"))
    store = _store(state)  # killed: no save, the journal replayed
    assert store.duplicate(store.entity("dd-q", None), _raw("a"))
    store.save(state)  # a graceful stop
    store = _store(state)
    assert store.duplicate(store.entity("dd-q", None), _raw("a"))
    assert not store.duplicate(store.entity("other", "queue"), _raw("a"))  # no duplicate detection there
    store = _store(state, window=0.05)  # forgotten once the window (as configured now) has passed
    time.sleep(0.1)
    assert not store.duplicate(store.entity("dd-q", None), _raw("a"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(min_size=1, max_size=MAX_MESSAGE_ID)), max_size=30))
def test_each_id_is_kept_once_and_only_bad_ids_are_refused(ids: list[str | None]) -> None:
    store = Store(30, duplicate_detection={"*": 600.0})
    queue = store.entity("dd-q", "queue")
    kept = [i for n, i in enumerate(ids) if not store.duplicate(queue, _raw(i, str(n)))]
    assert kept == [i for n, i in enumerate(ids) if i is None or i not in ids[:n]]
    for bad in ("", "y" * (MAX_MESSAGE_ID + 1)):
        with pytest.raises(ValueError, match="MessageId"):
            store.check_ids(queue, [_raw("fine"), _raw(bad)])
