"""CloudEvents 1.0 (msgbus.cloudevents): any event round-trips through a real send and receive in binary and
structured mode on the embedded backends, and nothing a message holds gets past ``from_message`` as anything but
a ``DecodeError`` (so a handler's bad event is dead-lettered and the loop goes on)."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import msgbus
from msgbus.cloudevents import (
    AMQP_PREFIX,
    KAFKA_PREFIX,
    STRUCTURED_CONTENT_TYPE,
    CloudEvent,
    from_message,
    header_prefix,
    to_outgoing,
)
from msgbus.errors import DecodeError, InvalidMessage
from msgbus.testing import assert_dead_lettered, run_check, wait_for_messages
from msgbus.testing._runner import select

TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(st.characters(exclude_categories=("Cs",))),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
RESERVED = {"id", "source", "type", "specversion", "time", "subject", "dataschema", "datacontenttype", "data"}
EXTENSIONS = st.dictionaries(
    st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True).filter(lambda n: n not in RESERVED), TEXT, max_size=3
)
# (data, datacontenttype): what the SDK's event can hold, with a content type that says how to read it back.
DATA = st.one_of(
    st.none().map(lambda d: (d, None)),
    st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4).map(lambda d: (d, "application/json")),
    st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4).map(lambda d: (d, None)),
    TEXT.map(lambda d: (d, None)),
    TEXT.map(lambda d: (d, "text/plain; charset=utf-8")),
    st.binary(min_size=1, max_size=64).map(lambda d: (d, None)),
    st.binary(min_size=1, max_size=64).map(lambda d: (d, "application/vnd.example")),
)
TIMES = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9998, 1, 1), timezones=st.just(UTC))


@st.composite
def events(draw: st.DrawFn) -> CloudEvent:
    data, content_type = draw(DATA)
    attributes: dict[str, Any] = {"id": draw(TEXT), "source": draw(TEXT), "type": draw(TEXT), "time": draw(TIMES)}
    if draw(st.booleans()):
        attributes["subject"] = draw(TEXT)
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    if draw(st.booleans()):
        attributes["partitionkey"] = draw(TEXT)
    attributes.update(draw(EXTENSIONS))
    return CloudEvent(attributes, data)


def backend_url(backend: str, tmp: Path) -> str:
    return f"memory://{uuid.uuid4().hex}" if backend == "memory" else f"sqlite:///{tmp}/{uuid.uuid4().hex}.db"


async def roundtrip(url: str, event: CloudEvent, **how: Any) -> tuple[CloudEvent, msgbus.Message[Any]]:
    async with msgbus.connect(url) as bus:
        await bus.producer("events").send_many([to_outgoing(event, **how)])
        async with bus.consumer("events") as consumer:
            (msg,) = await wait_for_messages(consumer, 1)
        return from_message(msg), msg


def expected_attributes(event: CloudEvent, mode: str) -> dict[str, Any]:
    """What is received: the same attributes; in binary mode data without a content type gets the codec's."""
    want = dict(event.get_attributes())
    data = event.get_data()
    if mode == "binary" and "datacontenttype" not in want and data is not None:
        want["datacontenttype"] = {dict: "application/json", str: "text/plain; charset=utf-8"}.get(
            type(data), "application/octet-stream"
        )
    return want


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
@pytest.mark.parametrize(("mode", "prefix"), [("binary", KAFKA_PREFIX), ("binary", AMQP_PREFIX), ("structured", "")])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(event=events())
def test_any_event_roundtrips(backend: str, mode: str, prefix: str, tmp_path: Path, event: CloudEvent) -> None:
    how: dict[str, Any] = {"mode": mode, **({"prefix": prefix} if prefix else {})}
    got, msg = asyncio.run(roundtrip(backend_url(backend, tmp_path), event, **how))
    assert got.get_attributes() == expected_attributes(event, mode)
    assert got.get_data() == event.get_data()
    assert msg.key == event.get_extension("partitionkey")
    if mode == "binary":
        assert msg.headers[f"{prefix}type"] == event.get_type()
        assert msg.headers[f"{prefix}specversion"] == "1.0"
        assert f"{prefix}datacontenttype" not in msg.headers, "datacontenttype is the message's content type"
        want_header = event.get_datacontenttype() if prefix == KAFKA_PREFIX else None
        assert msg.headers.get("content-type") == want_header, "the Kafka binding's content-type header"
    else:
        assert msg.content_type == STRUCTURED_CONTENT_TYPE
        assert json.loads(msg.payload)["id"] == event.get_id()


def test_binary_mode_headers_follow_the_bindings() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    event = CloudEvent({"id": "1", "source": "/orders", "type": "order.placed", "time": when}, {"id": 42})
    out = to_outgoing(event)
    assert out.headers == {
        "ce_id": "1",
        "ce_source": "/orders",
        "ce_type": "order.placed",
        "ce_specversion": "1.0",
        "ce_time": "2026-01-02T03:04:05.600000Z",
    }
    assert out.body == {"id": 42} and out.content_type is None
    assert set(to_outgoing(event, prefix=AMQP_PREFIX).headers or {}) == {
        "cloudEvents_id",
        "cloudEvents_source",
        "cloudEvents_type",
        "cloudEvents_specversion",
        "cloudEvents_time",
    }


def test_the_prefix_is_the_brokers_binding() -> None:
    assert header_prefix(msgbus.connect("memory://")) == KAFKA_PREFIX
    assert header_prefix(msgbus.connect("kafka://127.0.0.1:9092")) == KAFKA_PREFIX
    assert header_prefix(msgbus.connect("amqp://guest:guest@127.0.0.1:5672/")) == AMQP_PREFIX


def test_bad_mode_or_prefix_is_invalid_message() -> None:
    event = CloudEvent({"source": "/s", "type": "t"})
    with pytest.raises(InvalidMessage, match="mode"):
        to_outgoing(event, mode="wire")  # type: ignore[arg-type]
    with pytest.raises(InvalidMessage, match="prefix"):
        to_outgoing(event, prefix="cloudEvents:")  # SQS refuses ':' in a header name


def event_json(drop: str | None, specversion: Any) -> bytes:
    """A structured event with one required attribute left out (or none) and any specversion."""
    fields = {"id": "1", "source": "/s", "type": "t", "specversion": specversion}
    return json.dumps({k: v for k, v in fields.items() if k != drop}).encode()


@settings(max_examples=150, deadline=None)
@given(
    payload=st.binary(max_size=200)
    | st.builds(lambda v: json.dumps(v).encode(), JSON_VALUES)
    | st.builds(event_json, st.sampled_from(["id", "source", "type", "specversion", None]), JSON_VALUES),
    headers=st.dictionaries(
        st.sampled_from(["ce_id", "ce_source", "ce_type", "ce_specversion", "ce_time", "cloudEvents_id", "other"]),
        st.text(st.characters(exclude_categories=("Cs",)), max_size=30),
    ),
    structured=st.booleans(),
)
def test_hostile_messages_raise_decode_error_only(payload: bytes, headers: dict[str, str], structured: bool) -> None:
    async def main() -> None:
        async with msgbus.connect(f"memory://{uuid.uuid4().hex}") as bus:
            ctype = STRUCTURED_CONTENT_TYPE if structured else "application/octet-stream"
            await bus.producer("q").send(payload, headers=headers, content_type=ctype)
            msgs = await bus.consumer("q").receive(1, 5.0)
            if not msgs:  # not JSON at all: msgbus's own decoding dead-letters it before any handler
                assert structured
                await assert_dead_lettered(bus, "q", reason="DecodeError")
                return
            try:
                event = from_message(msgs[0])
            except DecodeError:
                return
            assert event.get_id() and event.get_source() and event.get_type()

    asyncio.run(main())


async def test_a_handler_given_a_bad_event_dead_letters_it_and_goes_on(bus: msgbus.Bus) -> None:
    good = CloudEvent({"id": "ok", "source": "/s", "type": "t"}, {"n": 1})
    producer = bus.producer("events")
    await producer.send(b'{"specversion": "1.0", "id": ""}', content_type=STRUCTURED_CONTENT_TYPE)
    await producer.send_many([to_outgoing(good)])
    seen: list[str] = []

    async def handle(msg: msgbus.Message[Any]) -> None:
        seen.append(from_message(msg).get_id())

    consumer = bus.consumer("events", retry=msgbus.RetryPolicy(max_attempts=1))
    task = asyncio.create_task(consumer.run(handle))
    (dead,) = await assert_dead_lettered(bus, "events", reason="DecodeError")
    assert dead.payload == b'{"specversion": "1.0", "id": ""}'
    async with asyncio.timeout(5):
        while seen != ["ok"]:
            await asyncio.sleep(0.01)
    consumer.stop()
    await task


async def test_the_contract_check_runs_here_and_skips_without_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dev install (CI's) has the SDK, so the contract's CloudEvents check runs rather than skips; a user
    without the extra gets a skip that names it."""
    monkeypatch.delenv("MSGBUS_CONTRACT_RESULTS", raising=False)
    (check,) = select("CloudEvents round-trip")
    ran = await run_check(check, f"memory://{uuid.uuid4().hex}")
    assert ran.status == "pass", ran.detail
    monkeypatch.setitem(sys.modules, "msgbus.cloudevents", None)  # import msgbus.cloudevents raises ImportError
    skipped = await run_check(check, f"memory://{uuid.uuid4().hex}")
    assert (skipped.status, skipped.detail) == (
        "skip",
        "the CloudEvents SDK is not installed (pip install 'msgbus[cloudevents]')",
    )
