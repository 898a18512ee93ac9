"""The Service Bus test broker's sessions, driven by the azure-servicebus SDK itself (what the SDK does with
each answer is the check): session filter and lock, next-available, renewal, lock loss, session state, entities
that require sessions. The adapter's use of them is proved by the contract suite with ``ordering=per_key``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusMessage
from azure.servicebus import exceptions as sb
from azure.servicebus.aio import ServiceBusClient
from proton import Message

from integration.brokers import Endpoint
from integration.sbbroker import codec
from integration.sbbroker.store import Store

pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:unclosed:ResourceWarning"),
]


def _connection_string(url: str) -> str:
    parts = urlsplit(url)
    return (
        f"Endpoint=sb://{parts.hostname}:{parts.port}/;SharedAccessKeyName={unquote(parts.username or '')};"
        f"SharedAccessKey={unquote(parts.password or '')};UseDevelopmentEmulator=true"
    )


@pytest.fixture
async def client(broker_url: Callable[[str], Endpoint]) -> AsyncIterator[ServiceBusClient]:
    endpoint = broker_url("servicebus")
    if endpoint.handle is None and "127.0.0.1" not in endpoint.url:
        pytest.skip("checks the local test broker's sessions, not a real namespace")
    async with ServiceBusClient.from_connection_string(_connection_string(endpoint.url)) as sdk:
        yield sdk


async def _session_queue(client: ServiceBusClient) -> str:
    """A new queue that requires sessions: its first receiver, a session receiver, decides."""
    name = f"sess-{uuid.uuid4().hex[:10]}"
    async with client.get_queue_receiver(name, session_id="first"):
        pass
    return name


async def _send(client: ServiceBusClient, queue: str, items: list[tuple[str, str]]) -> None:
    async with client.get_queue_sender(queue) as sender:
        await sender.send_messages([ServiceBusMessage(body, session_id=session) for session, body in items])


async def test_a_session_receiver_gets_its_sessions_messages_in_order_and_abandoned_first_again(
    client: ServiceBusClient,
) -> None:
    queue = await _session_queue(client)
    await _send(client, queue, [("A", "a0"), ("B", "b0"), ("A", "a1"), ("A", "a2"), ("B", "b1")])
    async with client.get_queue_receiver(queue, session_id="A") as receiver:
        locked_until = receiver.session.locked_until_utc
        assert locked_until is not None and locked_until > datetime.now(UTC)  # from locked-until-utc (ticks)
        got = await receiver.receive_messages(max_message_count=10, max_wait_time=1)
        assert [str(m) for m in got] == ["a0", "a1", "a2"]
        assert {m.session_id for m in got} == {"A"} and [m.delivery_count for m in got] == [0, 0, 0]
        await receiver.abandon_message(got[0])
        again = await receiver.receive_messages(max_message_count=1, max_wait_time=1)
        assert [str(m) for m in again] == ["a0"] and again[0].delivery_count == 1
        for message in [*again, *got[1:]]:
            await receiver.complete_message(message)
        assert await receiver.receive_messages(max_message_count=1, max_wait_time=0.3) == []


async def test_one_receiver_per_session_and_next_available_takes_a_free_one(client: ServiceBusClient) -> None:
    queue = await _session_queue(client)
    await _send(client, queue, [("A", "a0"), ("B", "b0")])
    async with client.get_queue_receiver(queue, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=2) as first:
        assert first.session.session_id == "A"  # the session whose next message is oldest
        with pytest.raises(sb.SessionCannotBeLockedError):
            async with client.get_queue_receiver(queue, session_id="A") as second:
                await second.receive_messages(max_message_count=1, max_wait_time=0.5)
        async with client.get_queue_receiver(queue, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=2) as other:
            assert other.session.session_id == "B"
            await first.session.renew_lock()  # the test broker's locks last 3 s: keep both held
            await other.session.renew_lock()
            started = time.monotonic()
            with pytest.raises(sb.OperationTimeoutError):  # none free: the attach waits, then times out
                async with client.get_queue_receiver(
                    queue, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=1
                ) as third:
                    await third.receive_messages(max_message_count=1, max_wait_time=0.5)
            assert time.monotonic() - started >= 0.9


async def test_next_available_waits_for_a_session_that_gets_a_message(client: ServiceBusClient) -> None:
    queue = await _session_queue(client)

    async def later() -> None:
        await asyncio.sleep(1.0)
        await _send(client, queue, [("late", "x")])

    task = asyncio.create_task(later())
    async with client.get_queue_receiver(queue, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=8) as receiver:
        assert receiver.session.session_id == "late"
        got = await receiver.receive_messages(max_message_count=1, max_wait_time=2)
        assert [str(m) for m in got] == ["x"]
        await receiver.complete_message(got[0])
    await task


async def test_a_renewed_session_lock_holds_and_a_lost_one_gives_the_session_away(client: ServiceBusClient) -> None:
    queue = await _session_queue(client)
    await _send(client, queue, [("A", "a0"), ("A", "a1")])
    async with client.get_queue_receiver(queue, session_id="A") as holder:
        got = await holder.receive_messages(max_message_count=1, max_wait_time=1)
        before = holder.session.locked_until_utc
        await asyncio.sleep(0.3)
        assert await holder.session.renew_lock() > before  # type: ignore[operator]
        await holder.session.set_state(b"step-1")
        assert await holder.session.get_state() == b"step-1"
        lock = (holder.session.locked_until_utc - datetime.now(UTC)).total_seconds()  # type: ignore[operator]
        await asyncio.sleep(lock + 1.0)  # not renewed: the broker takes the session back
        with pytest.raises((sb.SessionLockLostError, sb.ServiceBusError)):
            await holder.complete_message(got[0])
    async with client.get_queue_receiver(queue, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=2) as taker:
        back = await taker.receive_messages(max_message_count=2, max_wait_time=1)
        assert [str(m) for m in back] == ["a0", "a1"]
        assert back[0].delivery_count == 1  # a delivery whose session lock was lost counts
        for message in back:
            await taker.complete_message(message)


async def test_an_entity_that_requires_sessions_refuses_plain_receivers_and_messages_without_one(
    client: ServiceBusClient,
) -> None:
    queue = await _session_queue(client)
    with pytest.raises(sb.ServiceBusError):
        async with client.get_queue_receiver(queue) as plain:
            await plain.receive_messages(max_message_count=1, max_wait_time=0.5)
    with pytest.raises(sb.ServiceBusError, match="requires sessions"):
        async with client.get_queue_sender(queue) as sender:
            await sender.send_messages(ServiceBusMessage("no session"))
    plain_queue = f"plain-{uuid.uuid4().hex[:10]}"
    async with client.get_queue_receiver(plain_queue) as receiver:
        await receiver.receive_messages(max_message_count=1, max_wait_time=0.1)
    with pytest.raises(sb.ServiceBusError):
        async with client.get_queue_receiver(plain_queue, session_id="A") as session_receiver:
            await session_receiver.receive_messages(max_message_count=1, max_wait_time=0.5)


def test_requiring_sessions_and_each_messages_session_survive_a_kill(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    store = Store(lock_duration=30)
    store.open(state)
    mq = store.message_queue("orders")
    store.require_sessions(mq, True)
    for session in ("A", "B", "A"):
        store.enqueue(store.entity("orders", None), Message(body=session, group_id=session).encode())
    assert codec.group_id(Message(group_id="A").encode()) == "A"
    for _ in range(2):  # no save(): killed, twice
        store = Store(lock_duration=30)
        store.open(state)
        mq = store.message_queue("orders")
        assert mq.sessions is True
        assert mq.free_session(time.time()) == "A"
        assert [m.session for m in sorted(mq.messages.values(), key=lambda m: m.seq)] == ["A", "B", "A"]
