"""The consumer option ``content_type=`` (issue 18): what a payload that names no content type is.

Messages from code that does not use msgbus often carry JSON without saying so; the option decodes them, a
``model=`` consumer validates them either way, a message that names its own type keeps it, and nothing in a
payload stops the consumer: what does not decode is dead-lettered with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import msgbus
import msgbus.sync
from msgbus.adapter import HEADER_DEAD_LETTER_REASON, Endpoint, Record
from msgbus.errors import ConfigError
from msgbus.testing import wait_for_messages


def _untyped(body: bytes, content_type: str | None = None) -> Record:
    """A record as another producer writes it: no content type unless given."""
    return Record(body, uuid.uuid4().hex, {"origin": "raw"}, content_type=content_type, timestamp=time.time())


async def _put(bus: msgbus.Bus, queue: str, *records: Record) -> None:
    await bus.adapter.send(Endpoint("queue", queue), list(records))


@dataclasses.dataclass
class Order:
    id: int


@pytest.mark.parametrize("bad", [b"application/json", 1, "json", "", "application/json\n", "a/" + "b" * 300, "a b/c"])
async def test_bad_values_are_config_errors(bad: Any) -> None:
    async with msgbus.connect(f"memory://{uuid.uuid4().hex}") as bus:
        with pytest.raises(ConfigError, match="content_type"):
            bus.consumer("q", content_type=bad)
        with pytest.raises(ConfigError, match="content_type"):
            bus.subscriber("t", subscription="s", content_type=bad)
        with pytest.raises(ConfigError, match="content_type"):
            bus.dead_letters("q", content_type=bad)


def test_sync_facade_takes_the_option() -> None:
    with msgbus.sync.connect(f"memory://{uuid.uuid4().hex}") as bus:
        with pytest.raises(ConfigError, match="content_type"):
            bus.consumer("q", content_type="json")
        with pytest.raises(ConfigError, match="content_type"):
            bus.subscriber("t", subscription="s", content_type="json")
        with pytest.raises(ConfigError, match="content_type"):
            bus.dead_letters("q", content_type="json")
        with bus.consumer("q", content_type="application/json") as consumer:
            bus._portal.call(_put(bus._bus, "q", _untyped(b'{"a": 1}')))
            got = consumer.receive(timeout=5)
            assert [m.body for m in got] == [{"a": 1}]
            got[0].ack()


async def test_untyped_payloads_decode_by_the_option_typed_ones_by_their_own() -> None:
    bus = msgbus.connect(f"memory://{uuid.uuid4().hex}")
    async with bus, bus.consumer("plain") as plain, bus.consumer("json", content_type="application/json") as js:
        for q in ("plain", "json"):
            await _put(bus, q, _untyped(b'{"a": 1}'), _untyped(b"hi", "text/plain"), _untyped(b"\x00", ""))
        got_plain = await wait_for_messages(plain, 3)
        got_json = await wait_for_messages(js, 3)
    assert [m.body for m in got_plain] == [b'{"a": 1}', "hi", b"\x00"]  # "" is a type: unknown, so bytes
    assert [m.body for m in got_json] == [{"a": 1}, "hi", b"\x00"]
    assert [m.content_type for m in got_json] == [None, "text/plain", ""]  # the record keeps what it carried


async def test_a_model_consumer_validates_untyped_payloads_either_way() -> None:
    async with msgbus.connect(f"memory://{uuid.uuid4().hex}") as bus:
        for ctype in (None, "application/json"):
            q = f"orders-{ctype is None}"
            async with bus.consumer(q, model=Order, content_type=ctype) as consumer:
                await _put(bus, q, _untyped(b'{"id": "x"}'), _untyped(b"not json"), _untyped(b'{"id": 7}'))
                got = await wait_for_messages(consumer, 1)
                assert [m.body for m in got] == [Order(7)]
            async with bus.dead_letters(q) as dlq:
                dead = await wait_for_messages(dlq, 2)
            reasons = [m.headers[HEADER_DEAD_LETTER_REASON] for m in dead]
            assert all(r.startswith("DecodeError: ") for r in reasons), reasons


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payloads=st.lists(st.binary(max_size=64) | st.text(max_size=32).map(str.encode), min_size=1, max_size=12))
def test_hostile_untyped_payloads_never_stop_the_consumer(payloads: list[bytes]) -> None:
    """Every payload is either handed out as its JSON value or dead-lettered with a DecodeError reason: exact
    counts, and the consumer keeps receiving after each bad one."""

    def parses(raw: bytes) -> bool:
        try:
            json.loads(raw)
        except (ValueError, RecursionError):
            return False
        return True

    payloads = [*payloads, b'{"end": true}']  # a last good one: received means every bad one was met before
    good = [json.loads(p) for p in payloads if parses(p)]
    bad = len(payloads) - len(good)

    async def run() -> None:
        async with msgbus.connect(f"memory://{uuid.uuid4().hex}") as bus:
            async with bus.consumer("q", content_type="application/json") as consumer:
                await _put(bus, "q", *(_untyped(p) for p in payloads))
                got = await wait_for_messages(consumer, len(good))
                assert [_same(m.body) for m in got] == [_same(v) for v in good]  # NaN != NaN
            if bad:
                async with bus.dead_letters("q") as dlq:
                    dead = await wait_for_messages(dlq, bad)
                assert all(m.headers[HEADER_DEAD_LETTER_REASON].startswith("DecodeError: ") for m in dead)
                assert sorted(m.body for m in dead) == sorted(p for p in payloads if not parses(p))

    asyncio.run(run())


def _same(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
