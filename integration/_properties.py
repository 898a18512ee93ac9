"""Property-based checks of hostile input (hypothesis), run against any bus URL.

``tests/test_properties.py`` runs them on memory:// and sqlite:// with the full profile, and
``integration/test_properties.py`` on every real broker with a shorter one. Each property keeps one bus, on
an event loop in a thread of its own, for all its examples: examples are many and declaring a queue on a
broker is slow, so they share one queue, each tagging its messages, and every example drains what it sent.

- ``send_arguments``: any body, key, headers, ids, content type and delay either raise a msgbus error and
  store nothing, or are received exactly once with exactly what was sent.
- ``decode_path``: records with generated payloads, content types and headers, injected through
  ``Adapter.send`` in one batch: every one is either returned by ``receive()`` with sound metadata or
  dead-lettered with a ``DecodeError:`` reason; ``receive`` never raises.
- ``handler_outcomes``: handlers that return, raise, settle themselves, raise ``CancelledError`` or a
  ``BaseException``, under ``run()`` stopped at a generated point: exact accounting, sent = acked +
  dead-lettered + still queued, each message handled exactly at the attempts the retry policy gives it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import msgbus
from msgbus._redelivery import limit_reason
from msgbus.adapter import Endpoint, Record
from msgbus.errors import DecodeError, MsgbusError
from msgbus.testing._checks_messages import sound as _sound

__all__ = ["Profile", "decode_path", "handler_outcomes", "send_arguments"]

T = TypeVar("T")


@dataclass(frozen=True)
class Profile:
    """How many generated examples each property runs, and how long one may take (seconds)."""

    sends: int
    batches: int
    outcomes: int
    example_timeout: float = 60.0


class _Loop:
    """An event loop on a thread of its own; ``run`` blocks for a coroutine's result (bounded by a timeout)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="properties-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        # The outer bound fails the test when cancelling the coroutine itself hangs (seen on Service Bus).
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop).result(timeout + 30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@contextmanager
def _bus(url: str, timeout: float) -> Iterator[tuple[_Loop, msgbus.Bus]]:
    loop = _Loop()
    bus = msgbus.connect(url)
    try:
        loop.run(bus.open(), timeout)
        yield loop, bus
    finally:
        try:
            loop.run(bus.close(), timeout)
        finally:
            loop.close()


@dataclass(frozen=True)
class _Queue:
    """A fresh queue on an open bus, with a consumer (opened) and a consumer of its dead letters."""

    loop: _Loop
    bus: msgbus.Bus
    name: str
    consumer: msgbus.Consumer[Any]
    dead_letters: msgbus.Consumer[Any]


@contextmanager
def _queue(url: str, what: str, timeout: float) -> Iterator[_Queue]:
    with _bus(url, timeout) as (loop, bus):
        name = f"prop-{what}-{uuid.uuid4().hex[:10]}"
        q = _Queue(loop, bus, name, bus.consumer(name, prefetch=32), bus.dead_letters(name, prefetch=50))
        loop.run(q.consumer.open(), timeout)
        yield q


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,  # brokers: an example's time is the broker's, bounded by Profile.example_timeout instead
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        print_blob=True,
    )


async def _nothing_more(consumer: msgbus.Consumer[Any], window: float) -> list[str]:
    """What arrives within ``window`` seconds (should be nothing): ids, acked so they do not linger."""
    strays: list[str] = []
    end = asyncio.get_running_loop().time() + window
    while (left := end - asyncio.get_running_loop().time()) > 0:
        for msg in await consumer.receive(max_messages=50, timeout=min(left, 0.5)):
            strays.append(msg.id)
            await msg.ack()
    return strays


def _quiet_window(bus: msgbus.Bus) -> float:
    """Long enough for an unsettled message to come back after its lock expired."""
    return 0.5 + 1.2 * (bus.capabilities.lock_duration or 0.0)


# --- send arguments ------------------------------------------------------------------------------------

_TEXT = st.text(max_size=24)
_LONE_SURROGATES = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)
_TEXTISH = st.one_of(st.none(), _TEXT, _TEXT.map(lambda t: t + "\ud800"), st.integers(), st.binary(max_size=4))
_BODY = st.one_of(
    st.binary(max_size=64),
    _TEXT,
    _LONE_SURROGATES,
    st.dictionaries(_TEXT, st.one_of(st.integers(), _TEXT, st.none(), st.booleans()), max_size=3),
    st.lists(st.integers(), max_size=4),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(),
    st.booleans(),
    st.none(),
    st.sampled_from([object(), {1, 2}, b"", bytearray(b"ba"), [float("nan")], {"k": object()}]),
)
_HEADERS = st.one_of(
    st.none(),
    st.dictionaries(
        st.one_of(_TEXT, st.sampled_from(["x-msgbus-attempts", "X-Msgbus-Key", ""]), st.integers()),
        st.one_of(_TEXT, _LONE_SURROGATES, st.integers(), st.none()),
        max_size=3,
    ),
    st.sampled_from([[("a", "b")], "a=b", 5]),
)
# Never a valid positive delay: a message parked for later would show up in a later example.
_DELAY = st.one_of(
    st.none(),
    st.just(0),
    st.floats(max_value=-0.001),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 10**400, -(10**400), "1", True, timedelta(-1)]),
)
_CONTENT_TYPE = st.one_of(st.none(), st.sampled_from(["application/json", "text/plain", "", "x/y; a=b"]), _TEXTISH)


def send_arguments(url: str, profile: Profile) -> None:
    """Any send arguments: a msgbus error and nothing stored, or received once with exactly what was sent."""
    with _queue(url, "send", profile.example_timeout) as q:
        loop, bus, consumer, producer = q.loop, q.bus, q.consumer, q.bus.producer(q.name)
        dead_letters = q.dead_letters

        @_settings(profile.sends)
        @given(
            body=_BODY,
            key=_TEXTISH,
            headers=_HEADERS,
            message_id=_TEXTISH,
            correlation_id=_TEXTISH,
            content_type=_CONTENT_TYPE,
            delay=_DELAY,
            many=st.booleans(),
        )
        def prop(**kwargs: Any) -> None:
            loop.run(_one_send(bus, producer, consumer, dead_letters, **kwargs), profile.example_timeout)

        prop()
        strays = loop.run(_nothing_more(consumer, 1.0), profile.example_timeout)  # stored ones show at once
        assert strays == [], f"refused sends stored something: {strays}"


async def _one_send(
    bus: msgbus.Bus,
    producer: msgbus.Producer,
    consumer: msgbus.Consumer[Any],
    dead_letters: msgbus.Consumer[Any],
    *,
    body: Any,
    key: Any,
    headers: Any,
    message_id: Any,
    correlation_id: Any,
    content_type: Any,
    delay: Any,
    many: bool,
) -> None:
    meta = {"key": key, "headers": headers, "message_id": message_id, "correlation_id": correlation_id}
    try:
        if many:  # one bad item fails the whole call, and nothing of it is stored
            item = msgbus.Outgoing(body, content_type=content_type, **meta)
            (sent_id,) = await producer.send_many([item], delay=delay)
        else:
            sent_id = await producer.send(body, content_type=content_type, delay=delay, **meta)
    except MsgbusError:
        return
    except Exception as exc:  # anything else is the defect this property is about
        raise AssertionError(f"send raised {type(exc).__name__}, not a msgbus error: {exc}") from exc
    payload, ctype = msgbus._codec.encode(body, content_type)
    try:
        msgbus._codec.decode(payload, ctype)
    except DecodeError:  # bytes its own content type cannot read (b"" as JSON): a consumer dead-letters them
        undecodable = True
    else:
        undecodable = False
    got: list[msgbus.Message[Any]] = []
    while not got:
        got = await consumer.receive(max_messages=1, timeout=0.5)
        if undecodable and not got:
            got = await dead_letters.receive(max_messages=1, timeout=0.5)
    (msg,) = got
    await msg.ack()
    if undecodable:
        assert msg.dead_letter_reason and msg.dead_letter_reason.startswith("DecodeError"), msg.dead_letter_reason
    assert msg.id == sent_id == (message_id or sent_id), f"received {msg.id!r}, sent {sent_id!r}"
    assert (msg.payload, msg.content_type) == (payload, ctype)
    shown = {k: v for k, v in msg.headers.items() if not (undecodable and k.startswith("x-msgbus-"))}  # its reason
    assert (shown, msg.key, msg.correlation_id) == (headers or {}, key, correlation_id)


# --- the receive and decode path -----------------------------------------------------------------------

_RESERVED = st.sampled_from(
    ["x-msgbus-timestamp", "x-msgbus-prior-attempts", "x-msgbus-overflow", "x-msgbus-empty", "x-msgbus-key"]
)
_WIRE_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20)
_PAYLOAD = st.one_of(
    st.binary(max_size=80),
    st.recursive(
        st.none() | st.booleans() | st.integers() | _WIRE_TEXT,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_WIRE_TEXT, inner, max_size=3),
        max_leaves=8,
    ).map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=1_000, max_value=20_000).map(lambda n: b"[" * n + b"]" * n),  # past the recursion limit
    st.sampled_from([b"\xff\xfe", b"{", b"NaN", b'"\\ud800"', b"\xef\xbb\xbf{}"]),
)
_PAYLOAD_TYPE = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/json",
            "application/problem+json",
            "APPLICATION/JSON; charset=utf-8",
            "text/plain",
            "text/plain; charset=latin-1",
            "application/octet-stream",
            "",
            ";",
        ]
    ),
    _WIRE_TEXT,
)
_WIRE_HEADERS = st.dictionaries(st.one_of(_WIRE_TEXT.filter(bool), _RESERVED), _WIRE_TEXT, max_size=4)


def decode_path(url: str, profile: Profile) -> None:
    """Generated payloads, content types and headers injected through ``Adapter.send``, one batch each:
    ``receive()`` never raises; each is returned with sound metadata or dead-lettered with ``DecodeError:``."""
    with _queue(url, "decode", profile.example_timeout) as q:
        loop, bus, queue, consumer, dead_letters = q.loop, q.bus, q.name, q.consumer, q.dead_letters

        @_settings(profile.batches)
        @given(
            st.lists(st.tuples(_PAYLOAD, _PAYLOAD_TYPE, _WIRE_HEADERS, st.none() | _WIRE_TEXT), min_size=1, max_size=6)
        )
        def prop(items: list[tuple[bytes, str | None, dict[str, str], str | None]]) -> None:
            loop.run(_one_batch(bus, consumer, dead_letters, queue, items), profile.example_timeout)

        prop()
        strays = loop.run(_nothing_more(consumer, _quiet_window(bus)), profile.example_timeout)
        assert strays == [], f"delivered again after being settled: {strays}"


async def _one_batch(
    bus: msgbus.Bus,
    consumer: msgbus.Consumer[Any],
    dead_letters: msgbus.Consumer[Any],
    queue: str,
    items: list[tuple[bytes, str | None, dict[str, str], str | None]],
) -> None:
    tag = uuid.uuid4().hex[:12]
    now = time.time()
    records = [
        Record(body, f"prop-{tag}-{i}", headers, key, None, ctype, now)
        for i, (body, ctype, headers, key) in enumerate(items)
    ]
    try:
        await bus.adapter.send(Endpoint("queue", queue), records)
    except MsgbusError:
        return  # refused as a whole, typed (e.g. a header the broker cannot carry): nothing was stored
    except Exception as exc:
        raise AssertionError(f"Adapter.send raised {type(exc).__name__}, not a msgbus error: {exc}") from exc
    by_id = {r.id: r for r in records}
    placed: dict[str, str] = {}

    def place(msg: msgbus.Message[Any], where: str) -> None:
        rid = msg.id if msg.id in by_id else _by_payload(msg.payload, records, placed)
        assert rid is not None, f"{where}: a message this example did not send: {msg!r}"
        assert rid not in placed, f"{rid} {placed[rid]} and {where}"
        placed[rid] = where

    async def returned(msg: msgbus.Message[Any]) -> None:
        place(msg, "returned")
        assert _sound(msg), f"handed out with unsound metadata: {msg!r}"
        assert msg.payload == by_id[msg.id].body if msg.id in by_id else True
        await msg.ack()

    async def dead(msg: msgbus.Message[Any]) -> None:
        place(msg, "dead-lettered")
        reason = msg.dead_letter_reason or ""
        assert reason.startswith("DecodeError:"), f"dead-lettered with reason {reason[:100]!r}"
        await msg.ack()

    while len(placed) < len(records):
        for msg in await consumer.receive(max_messages=50, timeout=0.05):
            await returned(msg)
        for msg in await dead_letters.receive(max_messages=50, timeout=0.05):
            await dead(msg)


def _by_payload(payload: bytes, records: list[Record], placed: dict[str, str]) -> str | None:
    """A record the adapter could not read keeps its body, not always its id (e.g. a Redis entry id)."""
    return next((r.id for r in records if r.body == payload and r.id not in placed), None)


# --- handler outcomes ----------------------------------------------------------------------------------

OUTCOMES = ("return", "raise", "ack", "nack", "reject", "cancel", "base", "ack-raise")


class Boom(BaseException):
    """A BaseException from a handler: it ends run() (after nacking its message), as SystemExit would."""


def _step(steps: list[str], attempt: int) -> str:
    """What the handler does on ``attempt`` (``return`` once the script has run out)."""
    return steps[attempt - 1] if attempt <= len(steps) else "return"


def _end(step: str, attempt: int, max_attempts: int) -> str | None:
    """Where a message ends after its handler did ``step`` on ``attempt``; None: it comes back."""
    if step in ("return", "ack", "ack-raise"):
        return "acked"
    if step == "reject" or (step in ("raise", "cancel") and attempt >= max_attempts):
        return "dead-lettered"
    return None  # nacked, a failure under the limit, or a BaseException that ended run()


def handler_outcomes(url: str, profile: Profile) -> None:
    """Handlers that return, raise, settle, cancel or raise a BaseException, run() stopped at a generated
    point and started again: at every stop sent = acked + dead-lettered + still queued, each message's
    attempts only grow, it ends where its last handler call put it, and nothing settled comes back."""
    with _queue(url, "outcomes", profile.example_timeout) as q:
        loop, bus, queue, consumer, dead_letters = q.loop, q.bus, q.name, q.consumer, q.dead_letters

        @_settings(profile.outcomes)
        @given(
            scripts=st.lists(st.lists(st.sampled_from(OUTCOMES), max_size=4), min_size=1, max_size=6),
            max_attempts=st.integers(1, 3),
            concurrency=st.integers(1, 3),
            stop_after=st.none() | st.integers(1, 8),
        )
        def prop(scripts: list[list[str]], max_attempts: int, concurrency: int, stop_after: int | None) -> None:
            run = _outcomes(bus, consumer, dead_letters, queue, scripts, max_attempts, concurrency, stop_after)
            loop.run(run, profile.example_timeout)

        prop()
        strays = loop.run(_nothing_more(consumer, _quiet_window(bus)), profile.example_timeout)
        assert strays == [], f"delivered again after being settled: {strays}"


async def _outcomes(
    bus: msgbus.Bus,
    consumer: msgbus.Consumer[Any],
    dead_letters: msgbus.Consumer[Any],
    queue: str,
    scripts: list[list[str]],
    max_attempts: int,
    concurrency: int,
    stop_after: int | None,
) -> None:
    ids = await bus.producer(queue).send_many([{"i": i} for i in range(len(scripts))])
    steps = dict(zip(ids, scripts, strict=True))
    calls: dict[str, list[int]] = {i: [] for i in ids}
    ends: dict[str, str] = {}  # where each handler call said the message ends
    dead: set[str] = set()  # read back from the dead-letter queue
    problems: list[str] = []  # a handler's assertion would only be a handler failure: collected instead
    handled = asyncio.Event()

    async def handle(msg: msgbus.Message[Any]) -> None:
        handled.set()
        if msg.id not in steps or msg.id in ends:
            problems.append(f"{msg!r} handled again after it ended ({ends.get(msg.id)}) or of no example")
            return
        if calls[msg.id] and msg.attempt <= calls[msg.id][-1]:
            problems.append(f"{msg.id}: attempt {msg.attempt} after {calls[msg.id]}")
        calls[msg.id].append(msg.attempt)
        step = _step(steps[msg.id], msg.attempt)
        end = _end(step, msg.attempt, max_attempts)
        if end is not None:
            ends[msg.id] = end
        if step == "raise":
            raise ValueError(f"outcome raise at attempt {msg.attempt}")
        if step == "cancel":
            raise asyncio.CancelledError  # the handler's own, not a cancellation of run()
        if step == "base":
            raise Boom
        if step == "ack":
            await msg.ack()
        elif step == "nack":
            await msg.nack()
        elif step == "reject":
            await msg.reject("outcome reject")
        elif step == "ack-raise":
            await msg.ack()
            raise ValueError("raised after acking")

    retry = msgbus.RetryPolicy(max_attempts=max_attempts, initial_backoff=0)

    async def read_dead_letters(timeout: float) -> None:
        for msg in await dead_letters.receive(max_messages=50, timeout=timeout):
            if msg.id not in steps or msg.id in dead:
                problems.append(f"dead letter of no example, or twice: {msg!r}")
            attempts = int(msg.headers.get(msgbus.HEADER_ATTEMPTS, "0"))
            if msg.id not in ends and msg.headers.get(msgbus.HEADER_DEAD_LETTER_REASON) == limit_reason(
                attempts, max_attempts
            ):
                # The delivery limit: delivered more than max_attempts times (its last handler call nacked it,
                # or a stop released it, or a BaseException ended run() under it): dead-lettered unhandled.
                ends[msg.id] = "dead-lettered"
            dead.add(msg.id)
            await msg.ack()

    while len(ends) < len(ids):
        task = asyncio.ensure_future(consumer.run(handle, concurrency=concurrency, retry=retry))
        stop_at = sum(map(len, calls.values())) + (stop_after or len(ids) * 8)
        while not task.done() and sum(map(len, calls.values())) < stop_at and len(ends) < len(ids):
            handled.clear()
            waiter = asyncio.ensure_future(handled.wait())
            await asyncio.wait([task, waiter], timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not handled.is_set():  # what is left may have gone over the delivery limit, unhandled
                await read_dead_letters(0.0)
        consumer.stop()
        try:
            await task
        except Boom:
            pass  # a handler's BaseException ended run(): its message was nacked on the way out
        await read_dead_letters(0.0)
        # At every stop: sent = acked + dead-lettered + still queued (those come back to the next run(), or
        # this loop never ends); the dead-letter queue holds only what a handler call dead-lettered.
        planned = {i for i, e in ends.items() if e == "dead-lettered"}
        assert dead <= planned, f"dead-lettered though its handler did not: {dead - planned}"
        assert not problems, problems
    planned = {i for i, e in ends.items() if e == "dead-lettered"}
    while dead != planned and not problems:
        await read_dead_letters(0.5)
        assert dead <= planned, f"dead-lettered though its handler did not: {dead - planned}"
    assert not problems, problems
    assert not problems, problems
