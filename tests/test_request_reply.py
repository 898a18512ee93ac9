"""Request/reply on the embedded backends: concurrency, timeouts, duplicates, hostile replies and requests."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import msgbus
from msgbus import Bus, Message, RetryPolicy, _memory
from msgbus.adapter import HEADER_REPLY_TO, Endpoint, Record
from msgbus.errors import ClosedError, ConnectionLost, DecodeError, InvalidMessage, RequestTimeout


@pytest.fixture(params=["memory", "sqlite"])
async def bus(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Bus]:
    url = f"memory://rr-{uuid.uuid4().hex[:8]}" if request.param == "memory" else f"sqlite:///{tmp_path}/rr.db"
    async with msgbus.connect(url) as bus:
        yield bus


async def echo(msg: Message[Any]) -> None:
    await msg.reply({"echo": msg.body})


async def serve(bus: Bus, queue: str, handler: Any, **run: Any) -> tuple[msgbus.Consumer[Any], asyncio.Task[None]]:
    consumer = bus.consumer(queue)
    return consumer, asyncio.create_task(consumer.run(handler, **run))


async def test_concurrent_requests_overlap_at_a_sleeping_responder(bus: Bus) -> None:
    """N requests at once against a responder that sleeps: every handler starts before any finishes, so the N
    take about one sleep, not N (the requester neither sends nor waits one at a time)."""
    n = 12
    events: list[tuple[str, int]] = []

    async def slow(msg: Message[Any]) -> None:
        events.append(("start", msg.body))
        await asyncio.sleep(0.2)
        events.append(("end", msg.body))
        await msg.reply(msg.body * 10)

    consumer, task = await serve(bus, "slow", slow, concurrency=n)
    replies = await asyncio.gather(*(bus.request("slow", i, timeout=30) for i in range(n)))
    consumer.stop()
    await task
    assert [r.body for r in replies] == [i * 10 for i in range(n)]  # each caller its own, in its own order
    first_end = next(i for i, (what, _) in enumerate(events) if what == "end")
    assert sorted(body for what, body in events[:first_end] if what == "start") == list(range(n))
    assert bus.dropped_replies == 0


async def test_timeout_is_typed_and_the_late_reply_goes_to_no_one(bus: Bus) -> None:
    with pytest.raises(RequestTimeout, match=r"no reply to request \w+ on queue 'late' within 0\.05s"):
        await bus.request("late", "first", timeout=0.05)
    (held,) = await bus.consumer("late").receive(timeout=5)
    assert held.body == "first" and held.headers[HEADER_REPLY_TO].startswith("msgbus-reply-")
    consumer, task = await serve(bus, "late", echo)
    asking = asyncio.create_task(bus.request("late", "second", timeout=30))
    await held.reply("late answer")  # reaches the listener while "second" waits: must not be taken for its reply
    await held.ack()
    assert (await asking).body == {"echo": "second"}
    consumer.stop()
    await task
    assert bus.dropped_replies == 1


async def test_a_crash_between_reply_and_ack_redelivers_and_the_requester_keeps_one_reply(bus: Bus) -> None:
    """Reply, then fail before the ack (a crash there): the request comes back, is answered again, and the
    requester gets one reply; the second is dropped and counted."""
    calls: list[int] = []

    async def reply_then_fail(msg: Message[Any]) -> None:
        calls.append(msg.attempt)
        await msg.reply({"attempt": msg.attempt})
        if msg.attempt == 1:
            raise RuntimeError("died after replying")

    consumer, task = await serve(bus, "crashy", reply_then_fail, retry=RetryPolicy(initial_backoff=0))
    reply = await bus.request("crashy", "go", timeout=30)
    while bus.dropped_replies < 1:  # the second reply: a duplicate, counted once it arrives
        await asyncio.sleep(0.01)
    consumer.stop()
    await task
    assert reply.body == {"attempt": 1} and calls == [1, 2] and bus.dropped_replies == 1


@pytest.mark.parametrize("correlation_id", [None, "unknown", "duplicate"])
async def test_hostile_replies_are_dropped_and_counted(bus: Bus, correlation_id: str | None) -> None:
    """Replies without a correlation id, with one no request has, or a second one for an answered request: dropped
    and counted, never handed to a waiting request; the listener goes on."""
    seen: list[Message[Any]] = []

    async def answer(msg: Message[Any]) -> None:
        seen.append(msg)
        await echo(msg)

    consumer, task = await serve(bus, "svc", answer)
    answered = await bus.request("svc", 1, timeout=30)
    reply_to = seen[0].headers[HEADER_REPLY_TO]
    cid = answered.correlation_id if correlation_id == "duplicate" else correlation_id
    waiting = asyncio.create_task(bus.request("nobody", "waits", timeout=30))  # must not get the forged reply
    await bus.producer(reply_to).send({"forged": True}, correlation_id=cid)
    while bus.dropped_replies < 1:
        await asyncio.sleep(0.01)
    assert (await bus.request("svc", 3, timeout=30)).body == {"echo": 3}  # the listener lives on
    assert not waiting.done()
    waiting.cancel()
    consumer.stop()
    await task
    assert answered.correlation_id == seen[0].id and bus.dropped_replies == 1


@pytest.mark.parametrize(
    ("headers", "problem"),
    [({}, "has no reply-to"), ({HEADER_REPLY_TO: "../../etc/passwd"}, "is not a queue name")],
)
async def test_replying_to_what_was_not_requested_dead_letters_it_with_the_reason(
    bus: Bus, headers: dict[str, str], problem: str
) -> None:
    """A handler that replies to a plain message (or one whose reply-to is no queue name): InvalidMessage, which
    under run() is a failure like any other: dead-lettered with the reason, nothing lost."""
    endpoint = Endpoint("queue", "plain")
    await bus.producer("plain").send("warm-up: declares the queue")
    await bus.adapter.send(endpoint, [Record(b'"hostile"', "m-1", headers, content_type="application/json")])
    consumer, task = await serve(bus, "plain", echo, retry=RetryPolicy(max_attempts=1))
    dead = bus.dead_letters("plain")
    got = []
    while len(got) < 2:
        got += await dead.receive(max_messages=10, timeout=5)
    consumer.stop()
    await task
    reasons = {m.body: m.dead_letter_reason or "" for m in got}
    assert set(reasons) == {"warm-up: declares the queue", "hostile"}
    assert all(r.startswith("InvalidMessage: ") for r in reasons.values()), reasons
    assert problem in reasons["hostile"] and "has no reply-to" in reasons["warm-up: declares the queue"]


async def test_reserved_reply_to_header_and_reply_after_ack_are_refused(bus: Bus) -> None:
    with pytest.raises(InvalidMessage, match="reserved"):
        await bus.request("svc", 1, headers={HEADER_REPLY_TO: "someone-else"}, timeout=1)
    asking = asyncio.create_task(bus.request("svc", 1, timeout=30))
    (msg,) = await bus.consumer("svc").receive(timeout=5)
    await msg.ack()
    with pytest.raises(InvalidMessage, match="settled: reply before ack"):
        await msg.reply("too late")
    asking.cancel()


async def test_an_undecodable_reply_reaches_its_caller_as_decode_error(bus: Bus) -> None:
    asking = asyncio.create_task(bus.request("raw", "?", timeout=30))
    (msg,) = await bus.consumer("raw").receive(timeout=5)
    forged = bus.producer(msg.headers[HEADER_REPLY_TO])
    await forged.send(b"{not json", content_type="application/json", correlation_id=msg.id)
    with pytest.raises(DecodeError, match="invalid JSON payload"):
        await asking
    await msg.ack()


@dataclass
class Answer:
    value: int


async def test_typed_reply_and_undecodable_reply(bus: Bus) -> None:
    async def answer(msg: Message[Any]) -> None:
        await msg.reply({"value": msg.body} if msg.body >= 0 else {"value": "not a number"})

    consumer, task = await serve(bus, "typed", answer)
    reply = await bus.request("typed", 7, model=Answer, timeout=30)
    assert reply.body == Answer(7)
    with pytest.raises(DecodeError):
        await bus.request("typed", -1, model=Answer, timeout=30)
    consumer.stop()
    await task


async def test_close_fails_waiting_requests_and_later_ones(bus: Bus) -> None:
    asking = asyncio.create_task(bus.request("nobody", 1, timeout=30))
    while bus._replies is None or not bus._replies._waiting:
        await asyncio.sleep(0.01)
    await bus.close()
    with pytest.raises(ClosedError, match="closed while request"):
        await asking
    with pytest.raises(ClosedError):
        await bus.request("nobody", 2, timeout=1)


def test_blocking_request_and_reply_from_threads() -> None:
    """``msgbus.sync``: a blocking responder thread replies; requests from several threads each get their own."""
    import concurrent.futures
    import threading

    from msgbus import sync

    with sync.connect(f"memory://rr-sync-{uuid.uuid4().hex[:8]}") as bus:
        consumer = bus.consumer("sync-svc")

        def answer(msg: sync.SyncMessage[Any]) -> None:
            msg.reply({"echo": msg.body})

        serving = threading.Thread(target=consumer.run, args=(answer,), kwargs={"concurrency": 4})
        serving.start()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda i: bus.request("sync-svc", i, timeout=30).body, range(16)))
        consumer.stop()
        serving.join()
        assert replies == [{"echo": i} for i in range(16)] and bus.dropped_replies == 0


CHILD = Path(__file__).with_name("reply_crash_child.py")
REPO = Path(__file__).resolve().parent.parent


async def test_a_responder_killed_between_reply_and_ack(tmp_path: Path) -> None:
    """A responder process SIGKILLed after its reply is stored and before its ack: the requester has the reply;
    the request comes back (attempt 2) to another responder, whose second reply is dropped and counted."""
    url = f"sqlite:///{tmp_path}/crash.db?visibility_timeout=1"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    async with msgbus.connect(url) as bus:
        asking = asyncio.create_task(bus.request("svc", "question", timeout=60))
        child = await asyncio.create_subprocess_exec(
            sys.executable, str(CHILD), url, "svc", stdout=asyncio.subprocess.PIPE, env=env
        )
        out, _ = await asyncio.wait_for(child.communicate(), 60)
        assert child.returncode == -signal.SIGKILL and b'"replied"' in out
        reply = await asking
        assert reply.body == {"by": "child", "attempt": 1}
        attempts: list[int] = []

        async def again(msg: Message[Any]) -> None:
            attempts.append(msg.attempt)
            await msg.reply({"by": "parent", "attempt": msg.attempt})

        consumer, task = await serve(bus, "svc", again)
        while bus.dropped_replies < 1:
            await asyncio.sleep(0.01)
        consumer.stop()
        await task
        assert attempts == [2] and bus.dropped_replies == 1


async def test_the_listener_survives_a_failed_receive(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reply queue's receive fails (a dropped connection): the listener receives again and the request
    still gets its reply."""
    real = _memory._MemoryReceiver.receive
    failures: list[str] = []

    async def flaky(self: Any, max_messages: int, timeout: float) -> list[Any]:
        name = self._endpoint.name
        if name.startswith("msgbus-reply-") and not failures:
            failures.append(name)
            raise ConnectionLost("connection reset (test)")
        return await real(self, max_messages, timeout)

    monkeypatch.setattr(_memory._MemoryReceiver, "receive", flaky)
    async with msgbus.connect(f"memory://rr-{uuid.uuid4().hex[:8]}") as bus:
        consumer, task = await serve(bus, "svc", echo)
        assert (await bus.request("svc", 1, timeout=30)).body == {"echo": 1}
        consumer.stop()
        await task
    assert len(failures) == 1


async def test_verify_only_topology_still_gets_its_reply_queue() -> None:
    """``topology=verify`` checks the service's queues but creates the bus's own reply queue; reply headers are
    checked like any sent headers."""
    name = f"memory://rr-{uuid.uuid4().hex[:8]}"

    async def answer(msg: Message[Any]) -> None:
        with pytest.raises(InvalidMessage, match="reserved"):
            await msg.reply("no", headers={"x-msgbus-attempts": "1"})
        await msg.reply({"echo": msg.body}, headers={"served-by": "svc"})

    async with msgbus.connect(name) as responder_bus, msgbus.connect(name, topology="verify") as bus:
        consumer, task = await serve(responder_bus, "svc", answer)
        await consumer.open()
        reply = await bus.request("svc", 1, timeout=30)
        assert reply.body == {"echo": 1} and reply.headers["served-by"] == "svc"
        consumer.stop()
        await task
