"""Hostile and careless input on the embedded backends (issue 14): each test is one defect that was seen.

Nothing a payload or its metadata holds stops a consumer, every public call raises msgbus errors only, a
bad item fails only its own call, and close()/sync never leave finished work or a caller hanging.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import msgbus
import msgbus.sync
from msgbus.adapter import MAX_DEAD_LETTER_REASON, Delivery, Endpoint, Receiver, Record
from msgbus.errors import ConfigError, InvalidMessage, MsgbusError
from msgbus.testing import assert_dead_lettered

BACKENDS = ["memory", "sqlite"]


@pytest.fixture(params=BACKENDS)
def msgbus_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both embedded backends, under the msgbus pytest plugin's ``bus`` fixture."""
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}?visibility_timeout=1"
    return f"sqlite:///{tmp_path}/bus.db?visibility_timeout=1"


async def _wait(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


class Tamper(Receiver):
    """The adapter's own receiver with each delivered record passed through ``change``: metadata no public
    send can produce, injected where an adapter hands records to the core."""

    def __init__(self, inner: Receiver, change: Callable[[Record], Record]) -> None:
        self.inner = inner
        self.change = change

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        got = await self.inner.receive(max_messages, timeout)
        for delivery in got:
            delivery.record = self.change(delivery.record)
        return got

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        await self.inner.ack_many(deliveries)

    async def close(self) -> None:
        await self.inner.close()


def tamper(bus: msgbus.Bus, change: Callable[[Record], Record]) -> None:
    """Wrap every receiver (but of dead letters) the bus's adapter makes from now on in ``Tamper``."""
    make = bus.adapter.receiver

    async def receiver(endpoint: Endpoint, prefetch: int) -> Receiver:
        inner = await make(endpoint, prefetch)
        return inner if endpoint.dead_letter else Tamper(inner, change)

    bus.adapter.receiver = receiver  # type: ignore[method-assign]


async def _run_until(consumer: msgbus.Consumer[Any], seen: list[Any], n: int) -> None:
    async def handle(msg: msgbus.Message[Any]) -> None:
        seen.append(msg.body)

    task = asyncio.create_task(consumer.run(handle, concurrency=2))
    try:
        await _wait(lambda: len(seen) >= n or task.done())
        assert not task.done(), f"run() ended: {task.exception() if not task.cancelled() else 'cancelled'}"
    finally:
        consumer.stop()
        await task


# --- the receive path: undecodable for any reason -> dead-lettered, the loop goes on ---------------------


async def test_json_nested_200000_deep_is_dead_lettered(bus: msgbus.Bus) -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    await bus.producer("q").send(deep, content_type="application/json")
    await bus.producer("q").send({"after": 1})
    seen: list[Any] = []
    await _run_until(bus.consumer("q"), seen, 1)
    assert seen == [{"after": 1}]
    (dead,) = await assert_dead_lettered(bus, "q", timeout=10)
    assert dead.payload == deep and (dead.dead_letter_reason or "").startswith("DecodeError:")


@pytest.mark.parametrize(
    "change",
    [
        lambda r: replace(r, content_type=5),
        lambda r: replace(r, content_type=b"application/json"),
        lambda r: replace(r, headers={"h": 5}),
        lambda r: replace(r, headers=[("h", "v")]),
        lambda r: replace(r, key=b"k"),
        lambda r: replace(r, id=None),
        lambda r: replace(r, body="text"),
        lambda r: replace(r, timestamp=float("nan")),
        lambda r: replace(r, timestamp="now"),
        lambda r: replace(r, correlation_id="\udc80"),
    ],
    ids=[
        "ctype-int",
        "ctype-bytes",
        "header-int",
        "headers-list",
        "key-bytes",
        "id-none",
        "body-str",
        "ts-nan",
        "ts-str",
        "surrogate",
    ],
)
async def test_metadata_of_the_wrong_type_on_receipt_is_dead_lettered(
    bus: msgbus.Bus, change: Callable[[Record], Record]
) -> None:
    """Non-str content type on receipt was a TypeError (sqlite) / AttributeError (memory) that stopped run()."""
    await bus.producer("q").send_many([{"bad": 1}, {"good": 2}])
    tamper(bus, lambda r: change(r) if b"bad" in r.body else r)
    seen: list[Any] = []
    await _run_until(bus.consumer("q"), seen, 1)
    assert seen == [{"good": 2}]
    (dead,) = await assert_dead_lettered(bus, "q", timeout=10)
    assert (dead.dead_letter_reason or "").startswith("DecodeError:"), dead.dead_letter_reason


@dataclasses.dataclass
class Picky:
    id: int

    def __post_init__(self) -> None:
        if self.id == 1:
            raise KeyError("picky")  # neither ValueError nor TypeError: it escaped the decode path


async def test_a_model_raising_its_own_error_is_dead_lettered(bus: msgbus.Bus) -> None:
    await bus.producer("q").send_many([{"id": 1}, {"id": 2}])
    seen: list[Any] = []
    await _run_until(bus.consumer("q", model=Picky), seen, 1)
    assert seen == [Picky(2)]
    (dead,) = await assert_dead_lettered(bus, "q", timeout=10)
    assert (dead.dead_letter_reason or "").startswith("DecodeError:"), dead.dead_letter_reason


@pytest.mark.parametrize("model", ["Order", 5, object(), [int]])
def test_a_model_that_cannot_validate_is_refused_up_front(model: Any) -> None:
    bus = msgbus.connect(f"memory://{uuid.uuid4().hex}")
    with pytest.raises(ConfigError, match="model"):
        bus.consumer("q", model=model)


# --- public calls raise msgbus errors only; one bad item fails only its own call -------------------------

BAD_SENDS: dict[str, dict[str, Any]] = {
    "content_type=5": {"content_type": 5},
    "content_type=[..]": {"content_type": ["application/json"]},
    "delay=10**400": {"delay": 10**400},
    "delay=inf": {"delay": float("inf")},
    "delay=nan": {"delay": float("nan")},
    "key=lone surrogate": {"key": "k\ud800"},
    "header=lone surrogate": {"headers": {"h": "\udfff"}},
    "header name=lone surrogate": {"headers": {"\udfff": "v"}},
    "message_id=lone surrogate": {"message_id": "\ud800"},
    "correlation_id=lone surrogate": {"correlation_id": "\ud800"},
}


@pytest.mark.parametrize("kwargs", list(BAD_SENDS.values()), ids=list(BAD_SENDS))
async def test_bad_send_arguments_raise_invalid_message(bus: msgbus.Bus, kwargs: dict[str, Any]) -> None:
    producer = bus.producer("q")
    with pytest.raises(InvalidMessage):
        await producer.send(b"x", **kwargs)
    with pytest.raises(InvalidMessage):
        if "delay" in kwargs:
            await producer.send_many([b"x"], delay=kwargs["delay"])
        else:
            await producer.send_many([b"ok", msgbus.Outgoing(b"x", **kwargs)])
    assert await bus.consumer("q").receive(10, 0.2) == [], "nothing of a refused send may be stored"


@pytest.mark.parametrize("items", ["abc", b"abc", {"a": 1}, 5])
async def test_send_many_refuses_what_is_not_a_list_of_bodies(bus: msgbus.Bus, items: Any) -> None:
    with pytest.raises(InvalidMessage):
        await bus.producer("q").send_many(items)


async def test_one_bad_key_in_concurrent_sends_fails_only_its_own(bus: msgbus.Bus) -> None:
    """sqlite coalesces concurrent sends into one batch; a lone surrogate in one key failed all of them."""
    producer = bus.producer("q")
    keys = [f"k{i}" for i in range(20)]
    keys[7] = "bad\ud800"
    results = await asyncio.gather(
        *(producer.send({"i": i}, key=k) for i, k in enumerate(keys)), return_exceptions=True
    )
    assert [type(r).__name__ for r in results if isinstance(r, BaseException)] == ["InvalidMessage"]
    assert isinstance(results[7], InvalidMessage)
    got: list[msgbus.Message[Any]] = []
    async with asyncio.timeout(10):
        while len(got) < 19:
            batch = await bus.consumer("q").receive(50, 0.5)
            got += batch
            for msg in batch:
                await msg.ack()
    assert sorted(m.body["i"] for m in got) == [i for i in range(20) if i != 7]


@pytest.mark.parametrize("delay", ["5", float("nan"), float("inf"), -1, 10**400, True])
async def test_bad_nack_delay_raises_and_leaves_the_message_unsettled(bus: msgbus.Bus, delay: Any) -> None:
    """nack("5") was a TypeError after marking the message settled; nack(inf) parked it for good."""
    await bus.producer("q").send(b"x")
    (msg,) = await bus.consumer("q").receive(1, 2.0)
    with pytest.raises(InvalidMessage):
        await msg.nack(delay)
    assert not msg.settled
    with pytest.raises(InvalidMessage):
        await msg.reject(5)  # type: ignore[arg-type]
    await msg.nack(0)
    (again,) = await bus.consumer("q").receive(1, 2.0)
    assert again.id == msg.id and again.attempt == 2


@pytest.mark.parametrize("name", ["orders\n", "orders\r", "\norders", "ord\x00ers"])
def test_queue_names_with_a_newline_are_refused(name: str) -> None:
    """``$`` matched before a trailing newline, so "orders\\n" passed the name check."""
    bus = msgbus.connect(f"memory://{uuid.uuid4().hex}")
    for make in (bus.producer, bus.consumer, bus.publisher, bus.dead_letters):
        with pytest.raises(ConfigError):
            make(name)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": "3"},
        {"max_attempts": 1.5},
        {"max_attempts": True},
        {"initial_backoff": float("nan")},
        {"max_backoff": float("inf")},
        {"multiplier": 0.5},
        {"jitter": float("nan")},
        {"jitter": 2},
        {"initial_backoff": "1"},
    ],
)
def test_retry_policy_validation_is_typed(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        msgbus.RetryPolicy(**kwargs)


def test_backoff_never_overflows() -> None:
    """multiplier ** (attempt - 1) overflowed a float at attempt ~1025."""
    policy = msgbus.RetryPolicy(jitter=0)
    assert [policy.backoff(a) for a in (1, 2, 1025, 10**6)] == [0.5, 1.0, 30.0, 30.0]
    assert msgbus.RetryPolicy(initial_backoff=0, jitter=0).backoff(10**6) == 0.0
    assert msgbus.RetryPolicy(multiplier=1e308, jitter=0).backoff(3) == 30.0
    with pytest.raises(ConfigError):
        policy.backoff("2")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        "memory://x?visibility_timeout=inf",
        "memory://x?visibility_timeout=-inf",
        "memory://x?visibility_timeout=1e300",
        "memory://x?visibility_timeout=nan",
        "sqlite:///./a.db?poll_interval=inf",
        "sqlite:///./a.db?busy_timeout=1e99",
        "sqlite:///./a\x00b.db",
        "sqlite:///./a\udc80.db",
    ],
)
def test_non_finite_options_and_bad_paths_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        msgbus.connect(url)


def test_non_finite_keyword_options_are_config_errors() -> None:
    for value in (float("inf"), float("nan"), 1e300):
        with pytest.raises(ConfigError):
            msgbus.connect("memory://x", visibility_timeout=value)


async def test_bad_consumer_arguments_are_config_errors(bus: msgbus.Bus) -> None:
    bad: Any = "x"
    for make in (
        lambda: bus.consumer("q", prefetch=0),
        lambda: bus.consumer("q", prefetch=10**30),
        lambda: bus.consumer("q", prefetch=True),
        lambda: bus.consumer("q", retry=bad),
        lambda: bus.consumer("q", model=bad),
    ):
        with pytest.raises(ConfigError):
            make()
    consumer = bus.consumer("q")

    async def handle(msg: msgbus.Message[Any]) -> None:
        return None

    for call in (
        consumer.receive(0),
        consumer.receive(bad),
        consumer.receive(1, float("nan")),
        consumer.receive(1, -1),
        consumer.run(handle, concurrency=0),
        consumer.run(handle, concurrency=10**9),
        consumer.run(bad),
        consumer.run(handle, shutdown_timeout=float("inf")),
        consumer.run(handle, retry=bad),
    ):
        with pytest.raises(ConfigError):
            await call


# --- dead-letter reasons are bounded ---------------------------------------------------------------------


async def test_a_5_mb_exception_message_makes_a_bounded_dead_letter(bus: msgbus.Bus) -> None:
    """The reason was stored whole: a 5 MB dead letter, over the backend's own 1 MiB message limit."""
    await bus.producer("q").send(b"x")

    async def handle(msg: msgbus.Message[Any]) -> None:
        raise ValueError("\x1b[31m" + "e" * 5_000_000 + "\ud800")

    consumer = bus.consumer("q", retry=msgbus.RetryPolicy(max_attempts=1))
    task = asyncio.create_task(consumer.run(handle))
    (dead,) = await assert_dead_lettered(bus, "q", timeout=10)
    consumer.stop()
    await task
    reason = dead.dead_letter_reason or ""
    assert len(reason) <= MAX_DEAD_LETTER_REASON and reason.startswith("ValueError: \ufffd[31meee")
    assert reason.endswith("...") and reason.encode()


# --- the runtime: close() during run(), a handler's own CancelledError ------------------------------------


async def test_close_during_run_lets_in_flight_handlers_finish_and_ack(msgbus_url: str) -> None:
    """bus.close() closed the adapter under running handlers: their acks failed, finished work came back."""
    bus = msgbus.connect(msgbus_url)
    await bus.open()
    await bus.producer("q").send_many(list(range(8)))
    begun, done = list[int](), list[int]()

    async def slow(msg: msgbus.Message[Any]) -> None:
        begun.append(msg.body)
        await asyncio.sleep(0.3)
        done.append(msg.body)

    consumer = bus.consumer("q")
    task = asyncio.create_task(consumer.run(slow, concurrency=4))
    await _wait(lambda: len(begun) >= 2)
    await bus.close()  # from another task than run()'s
    await asyncio.wait_for(task, 5)
    assert sorted(done) == sorted(begun), "every handler that started finished"
    async with msgbus.connect(msgbus_url) as again:
        rest: list[msgbus.Message[Any]] = []
        await asyncio.sleep(1.2)  # past the visibility timeout: an unacked one would be back
        while batch := await again.consumer("q").receive(20, 0.5):
            rest += batch
            for msg in batch:
                await msg.ack()
    assert sorted(done + [m.body for m in rest]) == list(range(8)), "0 lost, 0 redelivered"


async def test_a_handler_closing_its_own_consumer_does_not_wait_for_itself(bus: msgbus.Bus) -> None:
    await bus.producer("q").send(b"x")
    consumer = bus.consumer("q")

    async def handle(msg: msgbus.Message[Any]) -> None:
        await msg.ack()
        await consumer.close()

    await asyncio.wait_for(consumer.run(handle, shutdown_timeout=30), 5)


async def test_handler_raising_cancelled_error_is_a_failure_not_a_stop(bus: msgbus.Bus) -> None:
    """run() returned as if stopped when a handler raised CancelledError itself."""
    await bus.producer("q").send_many([1, 2, 3])
    calls: list[tuple[int, int]] = []

    async def handle(msg: msgbus.Message[Any]) -> None:
        calls.append((msg.body, msg.attempt))
        if msg.body == 2 and msg.attempt == 1:
            raise asyncio.CancelledError  # e.g. an inner task's cancellation, passed up

    consumer = bus.consumer("q", retry=msgbus.RetryPolicy(initial_backoff=0))
    task = asyncio.create_task(consumer.run(handle))
    await _wait(lambda: len(calls) >= 4 or task.done())
    assert not task.done(), "run() ended on a handler's CancelledError"
    consumer.stop()
    await task
    assert sorted(calls) == [(1, 1), (2, 1), (2, 2), (3, 1)]


async def test_cancelling_run_still_stops_it(bus: msgbus.Bus) -> None:
    await bus.producer("q").send_many(list(range(5)))

    async def slow(msg: msgbus.Message[Any]) -> None:
        await asyncio.sleep(0.1)

    task = asyncio.create_task(bus.consumer("q").run(slow))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


async def test_a_base_exception_from_a_handler_ends_run_and_the_message_comes_back(bus: msgbus.Bus) -> None:
    class Stop(BaseException):
        pass

    await bus.producer("q").send(b"x")

    async def handle(msg: msgbus.Message[Any]) -> None:
        raise Stop

    with pytest.raises(Stop):
        await asyncio.wait_for(bus.consumer("q").run(handle), 5)
    (again,) = await bus.consumer("q").receive(1, 2.0)
    assert again.attempt == 2, "nacked on the way out, not left to its lock"


# --- msgbus.sync: a handler's SystemExit / KeyboardInterrupt never hangs the caller ----------------------

_SYNC_SCRIPT = """
import sys, uuid, msgbus.sync
with msgbus.sync.connect(f"memory://{{uuid.uuid4().hex}}?visibility_timeout=1") as bus:
    bus.producer("q").send_many([b"a", b"b"])
    consumer = bus.consumer("q")
    def handle(msg):
        raise {error}
    try:
        consumer.run(handle, concurrency=2, shutdown_timeout=2)
    except {name}:
        print("raised", flush=True)
    print("send after:", bool(bus.producer("q").send(b"c")), flush=True)
    print("queued:", sorted(m.payload.decode() for m in consumer.receive(5, 1.0)), flush=True)
"""


@pytest.mark.parametrize("error", ["SystemExit(3)", "KeyboardInterrupt()"])
def test_sync_run_survives_a_handler_raising_system_exit(error: str, tmp_path: Path) -> None:
    """The portal's loop died with the exception and every caller waited forever."""
    script = _SYNC_SCRIPT.format(error=error, name=error.split("(")[0])
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.stdout.splitlines() == ["raised", "send after: True", "queued: ['a', 'b', 'c']"], done.stderr


def test_sync_calls_fail_loudly_once_the_loop_has_stopped() -> None:
    bus = msgbus.sync.connect(f"memory://{uuid.uuid4().hex}")
    producer = bus.producer("q")
    bus.close()
    with pytest.raises(MsgbusError):
        producer.send(b"x")
