"""The idempotent inbox on SQLite: at most once per id, the id committed with the handler's writes."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

import msgbus
from msgbus import Handler, Message, RetryPolicy
from msgbus.errors import ConfigError
from msgbus.inbox import SqliteInbox
from msgbus.testing._crash import abandon


def _service_db(path: Path) -> SqliteInbox:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("CREATE TABLE effects (order_id INTEGER, message_id TEXT)")  # no unique key: doubles would show
    return SqliteInbox(conn, name="billing")


def _handler(inbox: SqliteInbox, calls: list[str], fail_first: set[str] | None = None) -> Handler:
    async def handle(msg: Message[Any]) -> None:
        calls.append(msg.id)
        inbox.connection().execute("INSERT INTO effects VALUES (?, ?)", (msg.body["order"], msg.id))
        if fail_first is not None and msg.id in fail_first:
            fail_first.discard(msg.id)
            raise RuntimeError("payment service timed out")  # after writing: the write must roll back too

    return handle


def _effects(inbox: SqliteInbox) -> list[tuple[int, str]]:
    return inbox._conn.execute("SELECT order_id, message_id FROM effects ORDER BY order_id").fetchall()


async def _run(bus: msgbus.Bus, handler: Handler, inbox: SqliteInbox, want: int) -> None:
    consumer = bus.consumer("orders", retry=RetryPolicy(max_attempts=5, initial_backoff=0.01, jitter=0))
    task = asyncio.create_task(consumer.run(handler, concurrency=4, middleware=[inbox]))
    async with asyncio.timeout(20):
        while len(_effects(inbox)) < want:
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # any double application would land by now
    consumer.stop()
    await task


async def test_redelivered_copies_of_one_id_apply_once(tmp_path: Path) -> None:
    inbox = _service_db(tmp_path / "service.db")
    calls: list[str] = []
    async with msgbus.connect(f"sqlite:///{tmp_path}/bus.db") as bus:
        producer = bus.producer("orders")
        for i in range(20):
            for _ in range(3):  # every message arrives three times, as an at-least-once broker may deliver it
                await producer.send({"order": i}, message_id=f"order-{i}")
        await _run(bus, _handler(inbox, calls), inbox, 20)
    effects = _effects(inbox)
    assert sorted(effects) == [(i, f"order-{i}") for i in range(20)]  # 60 delivered, 20 applied, 0 twice
    assert len(calls) == 20 and inbox.duplicates == 40


async def test_a_failed_handler_leaves_neither_its_writes_nor_the_id(tmp_path: Path) -> None:
    inbox = _service_db(tmp_path / "service.db")
    calls: list[str] = []
    failing = {f"order-{i}" for i in range(0, 20, 2)}
    async with msgbus.connect(f"sqlite:///{tmp_path}/bus.db") as bus:
        for i in range(20):
            await bus.producer("orders").send({"order": i}, message_id=f"order-{i}")
        await _run(bus, _handler(inbox, calls, set(failing)), inbox, 20)
    assert sorted(_effects(inbox)) == [(i, f"order-{i}") for i in range(20)]  # each once, the failed write gone
    assert len(calls) == 30 and inbox.duplicates == 0  # 10 failed once and ran again


async def test_a_crash_after_commit_before_ack_is_not_applied_again(tmp_path: Path) -> None:
    """The handler's transaction commits, the consumer dies before acking: the redelivery is skipped."""
    inbox = _service_db(tmp_path / "service.db")
    calls: list[str] = []
    wrapped = inbox(_handler(inbox, calls))
    async with msgbus.connect(f"sqlite:///{tmp_path}/bus.db?visibility_timeout=0.3") as bus:
        await bus.producer("orders").send({"order": 1}, message_id="order-1")
        doomed = bus.consumer("orders")
        [msg] = await doomed.receive(timeout=2)
        await wrapped(msg)  # committed
        await abandon(doomed)  # died before the ack
        again = bus.consumer("orders")
        [copy] = await again.receive(timeout=3)
        assert copy.id == "order-1" and copy.attempt == 2
        await wrapped(copy)
        await copy.ack()
    assert _effects(inbox) == [(1, "order-1")] and calls == ["order-1"] and inbox.duplicates == 1


class _CheckAfter(SqliteInbox):
    """Mutation: records the id in its own transaction after the handler, not in the handler's."""

    async def _once(self, message_id: str, handler: Handler, msg: Message[Any]) -> bool:
        conn = self._conn
        if conn.execute("SELECT 1 FROM msgbus_inbox WHERE message_id = ?", (message_id.encode(),)).fetchone():
            return False
        token = self._current.set(conn)
        try:
            await handler(msg)
        finally:
            self._current.reset(token)
        await asyncio.sleep(0.05)  # the window a crash or a concurrent copy falls into
        conn.execute(
            "INSERT OR IGNORE INTO msgbus_inbox VALUES (?, ?, ?)", (self.name, message_id.encode(), time.time())
        )
        return True


async def test_the_duplicate_test_catches_an_inbox_that_records_ids_apart_from_the_handler(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "service.db", isolation_level=None, check_same_thread=False)
    conn.execute("CREATE TABLE effects (order_id INTEGER, message_id TEXT)")
    inbox = _CheckAfter(conn, name="billing")
    async with msgbus.connect(f"sqlite:///{tmp_path}/bus.db") as bus:
        for i in range(20):
            for _ in range(3):
                await bus.producer("orders").send({"order": i}, message_id=f"order-{i}")
        await _run(bus, _handler(inbox, []), inbox, 20)
    assert len(_effects(inbox)) > 20  # copies handled side by side each applied: caught


async def test_ids_are_forgotten_after_the_retention(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "service.db", isolation_level=None, check_same_thread=False)
    conn.execute("CREATE TABLE effects (order_id INTEGER, message_id TEXT)")
    inbox = SqliteInbox(conn, name="billing", retention=0.2)
    async with msgbus.connect(f"sqlite:///{tmp_path}/bus.db") as bus:
        await bus.producer("orders").send({"order": 1}, message_id="same")
        consumer = bus.consumer("orders")
        wrapped = inbox(_handler(inbox, []))
        [msg] = await consumer.receive(timeout=2)
        await wrapped(msg)
        await msg.ack()
        await asyncio.sleep(0.3)
        await inbox._purge()
        assert conn.execute("SELECT count(*) FROM msgbus_inbox").fetchone()[0] == 0


def test_bad_inbox_settings_are_config_errors(tmp_path: Path) -> None:
    for kwargs in ({"name": ""}, {"table": "x; drop"}, {"retention": 0}):
        with pytest.raises(ConfigError):
            SqliteInbox(str(tmp_path / "x.db"), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="inside a handler"):
        SqliteInbox(str(tmp_path / "y.db")).connection()
