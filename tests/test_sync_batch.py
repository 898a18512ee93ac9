"""``SyncConsumer.run_batch`` (msgbus.sync) on memory://: plain-function batch handlers in threads, with the async
``run_batch``'s settlement rules: return acks, raise fails all, ``BatchResult`` fails only those it names, and
``stop()`` from a handler or another thread ends it with every ack in."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest

import msgbus
import msgbus.sync
from msgbus import BatchResult, RetryPolicy
from msgbus.sync import SyncBus, SyncMessage

FAST = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.02)


@pytest.fixture
def bus() -> Any:
    with msgbus.sync.connect(f"memory://sync-batch-{uuid.uuid4().hex[:8]}?visibility_timeout=1") as b:
        yield b


def rest(bus: SyncBus, queue: str) -> list[SyncMessage[Any]]:
    """What ``queue`` still holds (acked as read), until a receive finds nothing."""
    out: list[SyncMessage[Any]] = []
    with bus.consumer(queue, prefetch=100) as again:
        while got := again.receive(100, 0.3):
            out += got
            for m in got:
                m.ack()
    return out


def dead(bus: SyncBus, queue: str, n: int) -> dict[str, SyncMessage[Any]]:
    """``n`` dead letters of ``queue`` by id (acked as read)."""
    out: dict[str, SyncMessage[Any]] = {}
    with bus.dead_letters(queue) as dlq:
        for _ in range(50):
            for m in dlq.receive(n, 0.2):
                out[m.id] = m
                m.ack()
            if len(out) >= n:
                break
    return out


def test_return_acks_every_message_of_each_batch(bus: SyncBus) -> None:
    sent = bus.producer("q").send_many([{"i": i} for i in range(25)])
    consumer = bus.consumer("q")
    batches: list[list[int]] = []
    threads: set[str] = set()

    def handle(msgs: list[SyncMessage[Any]]) -> None:
        threads.add(threading.current_thread().name)
        batches.append([m.body["i"] for m in msgs])
        if sum(map(len, batches)) == 25:
            consumer.stop()

    consumer.run_batch(handle, max_batch=10, max_wait=0.2)
    assert sorted(i for b in batches for i in b) == list(range(25))  # each once: 25 sent, 25 handled, 0 twice
    assert max(map(len, batches)) == 10 and len(batches) >= 3
    assert "msgbus-portal" not in threads  # plain functions run off the event loop's thread
    assert rest(bus, "q") == []  # all acked
    assert len(sent) == 25


def test_raise_fails_the_whole_batch_each_on_its_own_attempts(bus: SyncBus) -> None:
    """Raise nacks every message of the batch under the retry policy: each comes back with attempt 2, and at
    max_attempts all are dead-lettered with the exception as the reason."""
    sent = set(bus.producer("q").send_many([{"i": i} for i in range(6)]))
    consumer = bus.consumer("q")
    attempts: dict[str, list[int]] = {}

    def handle(msgs: list[SyncMessage[Any]]) -> None:
        for m in msgs:
            attempts.setdefault(m.id, []).append(m.attempt)
        if all(len(a) == 2 for a in attempts.values()) and len(attempts) == 6:
            consumer.stop()
        raise RuntimeError("database down")

    consumer.run_batch(handle, max_batch=6, max_wait=0.2, retry=FAST, shutdown_timeout=5)
    assert set(attempts) == sent
    assert all(a == [1, 2] for a in attempts.values()), attempts
    letters = dead(bus, "q", 6)
    assert set(letters) == sent
    assert all("RuntimeError: database down" in (m.dead_letter_reason or "") for m in letters.values())
    assert rest(bus, "q") == []


def test_batch_result_fails_only_the_messages_it_names(bus: SyncBus) -> None:
    """A ``BatchResult`` naming ``SyncMessage`` views (or their ``.message``) fails those, retried then
    dead-lettered with their exception; the rest of the batch is acked once."""
    bus.producer("q").send_many([{"i": i} for i in range(10)])
    consumer = bus.consumer("q")
    seen: list[tuple[int, int]] = []

    def handle(msgs: list[SyncMessage[Any]]) -> BatchResult:
        seen.extend((m.body["i"], m.attempt) for m in msgs)
        if sum(1 for i, a in seen if i in (3, 7) and a == 2) == 2:
            consumer.stop()
        failed: dict[Any, BaseException] = {}
        for m in msgs:
            if m.body["i"] == 3:
                failed[m] = ValueError("row 3 refused")
            elif m.body["i"] == 7:
                failed[m.message] = ValueError("row 7 refused")
        return BatchResult(failed)

    consumer.run_batch(handle, max_batch=10, max_wait=0.2, retry=FAST, shutdown_timeout=5)
    firsts = sorted(i for i, a in seen if a == 1)
    assert firsts == list(range(10))
    assert sorted((i, a) for i, a in seen if a > 1) == [(3, 2), (7, 2)]  # only the named ones came back
    letters = dead(bus, "q", 2)
    assert sorted(m.body["i"] for m in letters.values()) == [3, 7]
    assert {m.body["i"]: m.dead_letter_reason for m in letters.values()} == {
        3: "ValueError: row 3 refused",
        7: "ValueError: row 7 refused",
    }
    assert rest(bus, "q") == []


def test_a_malformed_result_fails_the_batch(bus: SyncBus) -> None:
    bus.producer("q").send({"i": 1})
    consumer = bus.consumer("q")
    calls: list[int] = []

    def handle(msgs: list[SyncMessage[Any]]) -> Any:
        calls.append(msgs[0].attempt)
        if len(calls) == 2:
            consumer.stop()
        return "ok"

    consumer.run_batch(handle, max_wait=0, retry=FAST, shutdown_timeout=5)
    (letter,) = dead(bus, "q", 1).values()
    assert "TypeError" in (letter.dead_letter_reason or "")
    assert calls == [1, 2]


def test_stop_from_another_thread_lets_the_batch_in_flight_finish(bus: SyncBus) -> None:
    """``stop()`` called from another thread while a batch is in its handler: run_batch returns once that batch
    is done and acked; the messages never handed over stay on the queue, none lost, none handled twice."""
    sent = bus.producer("q").send_many([{"i": i} for i in range(40)])
    consumer = bus.consumer("q")
    started, release = threading.Event(), threading.Event()
    handled: list[str] = []

    def handle(msgs: list[SyncMessage[Any]]) -> None:
        started.set()
        release.wait(5)
        handled.extend(m.id for m in msgs)

    def stopper() -> None:
        started.wait(5)
        consumer.stop()
        release.set()

    other = threading.Thread(target=stopper)
    other.start()
    consumer.run_batch(handle, max_batch=5, max_wait=0.1, shutdown_timeout=5)
    other.join()
    left = [m.id for m in rest(bus, "q")]
    assert 5 <= len(handled) < 40
    assert sorted(handled + left) == sorted(sent)  # 40 sent = handled once + still queued, 0 lost
    assert not set(handled) & set(left)


def test_bad_options_raise_config_error(bus: SyncBus) -> None:
    with pytest.raises(msgbus.errors.ConfigError, match="max_batch must be an int from 1"):
        bus.consumer("q").run_batch(lambda msgs: None, max_batch=0)
