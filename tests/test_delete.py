"""Adapter.delete on the embedded backends, and the reply queue a bus deletes when it closes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import msgbus
from integration.test_delete import exists
from msgbus import Bus, Message, _reply
from msgbus.adapter import Endpoint, Record
from msgbus.cli import main
from msgbus.errors import BrokerError, CapabilityMissing, ClosedError, ConfigError, RequestTimeout

HOSTILE = ["x' OR '1'='1", "%", "_", "*", "a; DROP TABLE msgbus_endpoints", "ü\u202e", "q" * 300]


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"memory://del-{uuid.uuid4().hex[:8]}" if request.param == "memory" else f"sqlite:///{tmp_path}/del.db"


@pytest.fixture
async def bus(url: str) -> AsyncIterator[Bus]:
    async with msgbus.connect(url) as bus:
        yield bus


async def figures(bus: Bus, endpoint: Endpoint) -> tuple[float, float]:
    found = await bus.adapter.stats(endpoint)
    assert found is not None
    return found["depth"], found["dead_letters"]


async def echo(msg: Message[Any]) -> None:
    await msg.reply(msg.body)


async def test_close_deletes_the_reply_queue(url: str) -> None:
    async with msgbus.connect(url) as other:
        bus = msgbus.connect(url)
        consumer = other.consumer("echo")
        task = asyncio.create_task(consumer.run(echo))
        assert (await bus.request("echo", 7, timeout=30)).body == 7
        assert bus._replies is not None
        queue = bus._replies.queue
        assert await exists(other.adapter, queue)
        await bus.close()
        assert not await exists(other.adapter, queue)
        consumer.stop()
        await task


async def test_close_fails_a_waiting_request_then_deletes(url: str) -> None:
    bus = msgbus.connect(url)
    waiting = asyncio.create_task(bus.request("nobody", 1, timeout=30))
    while bus._replies is None or not bus._replies._waiting:
        await asyncio.sleep(0.01)
    queue = bus._replies.queue
    await bus.close()
    with pytest.raises(ClosedError):
        await waiting
    async with msgbus.connect(url) as other:
        assert not await exists(other.adapter, queue)


@pytest.mark.parametrize("failure", ["raises", "hangs", "cannot"])
async def test_a_failed_delete_is_logged_and_close_returns(
    url: str, failure: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bus = msgbus.connect(url)
    with pytest.raises(RequestTimeout):
        await bus.request("nobody", 1, timeout=0.05)

    async def broken(endpoint: Endpoint) -> None:
        if failure == "raises":
            raise BrokerError("refused by the broker")
        if failure == "hangs":
            await asyncio.Event().wait()
        raise CapabilityMissing("no delete here")

    monkeypatch.setattr(bus.adapter, "delete", broken)
    monkeypatch.setattr(_reply, "DELETE_TIMEOUT", 0.1)
    with caplog.at_level(logging.INFO, logger="msgbus"):
        await bus.close()
    assert bus._replies is not None
    logged = [r for r in caplog.records if bus._replies.queue in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].levelno == (logging.INFO if failure == "cannot" else logging.WARNING)
    assert ("refused by the broker" in logged[0].getMessage()) == (failure == "raises")


async def test_a_bus_that_made_no_request_deletes_nothing(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    bus = msgbus.connect(url)
    await bus.producer("jobs").send(b"x")
    calls: list[Endpoint] = []

    async def spy(endpoint: Endpoint) -> None:
        calls.append(endpoint)

    monkeypatch.setattr(bus.adapter, "delete", spy)
    await bus.close()
    assert calls == []


async def test_delete_is_idempotent(bus: Bus) -> None:
    await bus.adapter.delete(Endpoint("queue", "never-declared"))
    await bus.adapter.declare(Endpoint("queue", "once"))
    await bus.adapter.delete(Endpoint("queue", "once"))
    await bus.adapter.delete(Endpoint("queue", "once"))
    assert not await exists(bus.adapter, "once")


async def fill(bus: Bus, queue: str, waiting: int, dead: int) -> None:
    await bus.producer(queue).send_many([f"{queue}-{i}".encode() for i in range(waiting + dead)])
    if not dead:
        return
    async with bus.consumer(queue) as consumer:
        for msg in await consumer.receive(dead, timeout=5):
            await msg.reject("for the test")


async def test_delete_removes_messages_and_dead_letters_and_nothing_else(bus: Bus) -> None:
    await fill(bus, "doomed", waiting=3, dead=2)
    await fill(bus, "kept", waiting=4, dead=1)
    await bus.publisher("news").publish(b"n")  # no subscription yet: a declared topic
    await bus.adapter.declare(Endpoint("topic", "news", "mine"))
    await bus.publisher("news").publish(b"n")
    assert await figures(bus, Endpoint("queue", "doomed")) == (3, 2)
    await bus.adapter.delete(Endpoint("queue", "doomed"))
    assert not await exists(bus.adapter, "doomed")
    await bus.adapter.declare(Endpoint("queue", "doomed"))  # a new, empty queue of the same name
    assert await figures(bus, Endpoint("queue", "doomed")) == (0, 0)
    assert await figures(bus, Endpoint("queue", "kept")) == (4, 1)
    assert await figures(bus, Endpoint("topic", "news", "mine")) == (1, 0)


@pytest.mark.parametrize(
    "endpoint",
    [
        Endpoint("topic", "news"),
        Endpoint("topic", "news", "mine"),
        Endpoint("queue", "kept", dead_letter=True),
        Endpoint("queue", ""),
    ],
    ids=str,
)
async def test_only_a_queue_can_be_deleted(bus: Bus, endpoint: Endpoint) -> None:
    await fill(bus, "kept", waiting=2, dead=1)
    await bus.adapter.declare(Endpoint("topic", "news", "mine"))
    with pytest.raises(ConfigError, match="only a work queue can be deleted"):
        await bus.adapter.delete(endpoint)
    assert await figures(bus, Endpoint("queue", "kept")) == (2, 1)
    assert await bus.adapter.stats(Endpoint("topic", "news", "mine"))


@pytest.mark.parametrize("name", HOSTILE)
async def test_hostile_names_delete_only_themselves(bus: Bus, name: str) -> None:
    await fill(bus, "kept", waiting=2, dead=1)
    await bus.adapter.delete(Endpoint("queue", name))  # missing: nothing to do
    await bus.adapter.send(Endpoint("queue", name), [Record(b"h", "h-1")])  # names the Bus refuses reach adapters
    await bus.adapter.delete(Endpoint("queue", name))
    assert not await exists(bus.adapter, name)
    assert await figures(bus, Endpoint("queue", "kept")) == (2, 1)


async def test_sqlite_never_reuses_a_deleted_queue_id(tmp_path: Path) -> None:
    """A responder that cached the deleted reply queue's id and sends a late reply must not land in the queue
    declared next (SQLite hands out the highest id + 1: without tombstones the new queue would get that id)."""
    url = f"sqlite:///{tmp_path}/ids.db"
    async with msgbus.connect(url) as responder, msgbus.connect(url) as owner:
        await owner.adapter.declare(Endpoint("queue", "reply"))
        await responder.producer("reply").send(b"on time")  # the responder caches the id
        await owner.adapter.delete(Endpoint("queue", "reply"))
        await owner.adapter.declare(Endpoint("queue", "next"))
        await responder.adapter.send(Endpoint("queue", "reply"), [Record(b"late", "late-1")])
        assert await figures(owner, Endpoint("queue", "next")) == (0, 0)
    with contextlib.closing(sqlite3.connect(tmp_path / "ids.db")) as db:
        live = "SELECT id FROM msgbus_endpoints WHERE kind != 'deleted'"
        assert db.execute(f"SELECT count(*) FROM msgbus_messages WHERE endpoint IN ({live})").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM msgbus_endpoints WHERE kind = 'deleted'").fetchone() == (1,)


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("amqp://guest:pw@127.0.0.1:1/", "a" * 252),  # 256 bytes with .dlq
        ("amqp://guest:pw@127.0.0.1:1/", "a~b"),  # the client refuses it
        ("redis://127.0.0.1:1/0", "{other}"),  # another queue's hash tag
        ("kafka://127.0.0.1:1", "a b"),
        ("nats://127.0.0.1:1", "*"),  # a wildcard in the JetStream API subject
        ("nats://127.0.0.1:1", ">"),
        ("pubsub://test-project?emulator_host=127.0.0.1:1", "x~sub~s"),  # ~ separates resource id parts
        ("postgresql://u:pw@127.0.0.1:1/db", "q\x00"),
    ],
)
async def test_a_broker_adapter_refuses_a_name_it_cannot_delete_before_any_request(url: str, name: str) -> None:
    """Refused typed before any connection (the ports are closed: a request would be ``ConnectionLost``)."""
    adapter = msgbus.connect(url).adapter
    with pytest.raises(ConfigError):
        await adapter.delete(Endpoint("queue", name))


def test_msgbus_delete_asks_refuses_and_deletes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"

    async def setup() -> None:
        async with msgbus.connect(url) as bus:
            await fill(bus, "orders", waiting=2, dead=1)
            await fill(bus, "kept", waiting=1, dead=0)

    async def present(queue: str) -> bool:
        async with msgbus.connect(url) as bus:
            return await exists(bus.adapter, queue)

    asyncio.run(setup())
    assert main(["delete", url, "orders"]) == 2  # no terminal to ask on, no --yes
    assert "confirm on a terminal, or pass --yes" in capsys.readouterr().err
    assert asyncio.run(present("orders"))
    assert main(["delete", url, "bad name!", "--yes"]) == 2
    assert "queue name must be" in capsys.readouterr().err
    assert main(["delete", url, "orders", "--yes"]) == 0
    assert "deleted the queue orders with its messages and dead letters" in capsys.readouterr().out
    assert not asyncio.run(present("orders"))
    assert asyncio.run(present("kept"))
    assert main(["delete", url, "orders", "--yes"]) == 0  # gone already: not an error


def test_msgbus_delete_has_help_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "delete a work queue" in capsys.readouterr().out
    assert main(["delete", "--help"]) == 0
    assert "examples:\n  msgbus delete " in capsys.readouterr().out
