"""The property-based hostile-input suites (integration/_properties.py) on memory:// and sqlite://, full
profile; the real brokers run a shorter one in integration/test_properties.py. Plus what only an embedded
backend can take: records of the wrong types handed to the core by the adapter."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import msgbus
from integration import _properties
from msgbus.adapter import Record

PROFILE = _properties.Profile(sends=150, batches=50, outcomes=30)
SQLITE_PROFILE = _properties.Profile(sends=100, batches=30, outcomes=15)


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, _properties.Profile]:
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}?visibility_timeout=1", PROFILE
    return f"sqlite:///{tmp_path}/bus.db?visibility_timeout=1", SQLITE_PROFILE


def test_send_arguments(backend: tuple[str, _properties.Profile]) -> None:
    _properties.send_arguments(*backend)


def test_decode_path(backend: tuple[str, _properties.Profile]) -> None:
    _properties.decode_path(*backend)


def test_handler_outcomes(backend: tuple[str, _properties.Profile]) -> None:
    _properties.handler_outcomes(*backend)


# Values of any type for the fields of a received record: what a third-party adapter might hand the core.
_ANYTHING = st.one_of(
    st.none(),
    st.text(max_size=8),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2),
    st.binary(max_size=8),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.one_of(st.text(max_size=4), st.integers()), st.one_of(st.text(max_size=4), st.integers())),
)


@pytest.mark.parametrize("url", ["memory://{}?visibility_timeout=1", "sqlite:///{}/bus.db?visibility_timeout=1"])
def test_metadata_of_any_type_from_an_adapter_never_stops_run(url: str, tmp_path: Path) -> None:
    """Whatever types an adapter puts in a received record: run() goes on (one run() for every example),
    each message is handed to the handler with sound metadata or dead-lettered with a DecodeError reason,
    exactly once, and nothing settled comes back."""
    url = url.format(uuid.uuid4().hex if url.startswith("memory") else tmp_path)
    with _properties._bus(url, 30) as (loop, bus):
        damage: dict[str, dict[str, Any]] = {}  # example tag -> the fields its first message gets
        _tamper(bus, damage)
        # Examples run one after another and each waits for both its messages: whatever arrives meanwhile is
        # the current example's (a damaged message may have lost its tag, id and body).
        placed = {"handled": 0, "dead-lettered": 0}
        problems: list[str] = []

        async def handle(msg: msgbus.Message[Any]) -> None:
            if not _properties._sound(msg):
                problems.append(f"handed out with unsound metadata: {msg!r}")
            placed["handled"] += 1

        consumer = bus.consumer("q")
        dead_letters = bus.dead_letters("q")
        task = loop.run(_start(consumer.run(handle, concurrency=2)), 30)

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(
            fields=st.fixed_dictionaries(
                {},
                optional={
                    name: _ANYTHING
                    for name in ("body", "id", "headers", "key", "correlation_id", "content_type", "timestamp")
                },
            )
        )
        def prop(fields: dict[str, Any]) -> None:
            tag = uuid.uuid4().hex
            damage[tag] = fields
            loop.run(_example(bus, dead_letters, tag, placed, task), 30)

        prop()
        consumer.stop()
        loop.run(task, 30)
        strays = loop.run(_properties._nothing_more(bus.consumer("q"), 1.5), 30)
        assert strays == [] and not problems, (strays, problems[:3])


async def _start(coro: Any) -> asyncio.Task[Any]:
    return asyncio.ensure_future(coro)


async def _example(
    bus: msgbus.Bus, dead_letters: msgbus.Consumer[Any], tag: str, placed: dict[str, int], task: Any
) -> None:
    before = sum(placed.values())
    await bus.producer("q").send_many([{"tag": tag, "n": 1}, {"tag": tag, "n": 2}])
    while sum(placed.values()) < before + 2:
        assert not task.done(), f"run() ended: {task}"
        for msg in await dead_letters.receive(5, 0.02):
            assert (msg.dead_letter_reason or "").startswith("DecodeError:"), msg.dead_letter_reason
            placed["dead-lettered"] += 1
            await msg.ack()
    await asyncio.sleep(0.01)  # a third arrival (a duplicate) would be counted here, and fail the next check
    assert sum(placed.values()) == before + 2, "each message once, handled or dead-lettered"


def _tamper(bus: msgbus.Bus, damage: dict[str, dict[str, Any]]) -> None:
    """Each example's first message, as the adapter's receiver hands it to the core, gets its fields."""
    make = bus.adapter.receiver

    async def receiver(endpoint: Any, prefetch: int) -> Any:
        inner = await make(endpoint, prefetch)
        if endpoint.dead_letter:
            return inner
        real = inner.receive

        async def receive(max_messages: int, timeout: float) -> Any:
            got = await real(max_messages, timeout)
            for delivery in got:
                record = delivery.record
                body = json.loads(record.body)
                fields = damage.pop(body["tag"], None) if body.get("n") == 1 else None
                if fields is not None:
                    delivery.record = Record(**{**{f: getattr(record, f) for f in Record.__slots__}, **fields})
            return got

        inner.receive = receive
        return inner

    bus.adapter.receiver = receiver  # type: ignore[method-assign]
