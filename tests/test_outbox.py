"""The transactional outbox on SQLite, end to end without a broker: staging, the relay, kills, refusals."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

import msgbus
from msgbus import outbox
from msgbus.errors import ConfigError, InvalidMessage

CHILD = Path(__file__).with_name("outbox_relay_child.py")
ROOT = Path(__file__).resolve().parents[1]


def _app(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, customer TEXT)")
    outbox.create_table_sync(conn)
    return conn


def _place(conn: sqlite3.Connection, order: int, customer: str, *, commit: bool = True) -> str:
    """One service transaction: the order row and its event, committed or rolled back together."""
    conn.execute("BEGIN")
    conn.execute("INSERT INTO orders (id, customer) VALUES (?, ?)", (order, customer))
    msg_id = outbox.stage_sync(conn, {"order": order}, topic="order-placed", key=customer, headers={"n": str(order)})
    conn.execute("COMMIT" if commit else "ROLLBACK")
    return msg_id


async def _drain(sub: msgbus.Consumer[Any], want: int, *, idle: float = 5.0) -> list[msgbus.Message[Any]]:
    """Receive and ack until ``want`` distinct ids arrived or nothing came for ``idle`` seconds.

    Distinct: a relay killed mid-forward resends its batch (at least once), and counting those copies ended the
    drain before the last ids came (it failed as "lost" on a loaded machine, where kills land mid-batch more)."""
    got: list[msgbus.Message[Any]] = []
    ids: set[str] = set()
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    while len(ids) < want and loop.time() - quiet_since < idle:
        batch = await sub.receive(max_messages=100, timeout=0.2)
        for m in batch:
            await m.ack()
            ids.add(m.id)
        if batch:
            quiet_since = loop.time()
        got += batch
    return got


async def test_committed_messages_are_forwarded_with_their_ids_and_rolled_back_ones_never(tmp_path: Path) -> None:
    conn = _app(tmp_path / "app.db")
    committed = [_place(conn, i, f"c{i % 3}") for i in range(30)]
    rolled_back = [_place(conn, 100 + i, "c0", commit=False) for i in range(10)]
    bus_url = f"sqlite:///{tmp_path}/bus.db"
    async with msgbus.connect(bus_url) as bus:
        sub = bus.subscriber("order-placed", subscription="audit")
        await sub.open()
        relay = outbox.Relay(f"sqlite:///{tmp_path}/app.db", bus, batch=7)
        while await relay.forward_once():
            pass
        got = await _drain(sub, 30)
        assert await sub.receive(max_messages=10, timeout=0.3) == []
    assert [m.id for m in got] == committed  # 30 staged and committed, 30 received in commit order, 0 dup
    assert not set(rolled_back) & {m.id for m in got}  # 10 rolled back, 0 forwarded
    assert [m.body for m in got] == [{"order": i} for i in range(30)]
    assert all(m.key == f"c{int(m.headers['n']) % 3}" and m.content_type == "application/json" for m in got)
    assert relay.forwarded == 30 and conn.execute("SELECT count(*) FROM msgbus_outbox").fetchone()[0] == 0


async def test_a_message_the_bus_refuses_is_parked_and_the_rest_go_on_in_order(tmp_path: Path) -> None:
    conn = _app(tmp_path / "app.db")
    conn.execute("BEGIN")
    outbox.stage_sync(conn, "small-1", queue="jobs", key="k")
    big = outbox.stage_sync(conn, "x" * 5000, queue="jobs", key="k")
    outbox.stage_sync(conn, "small-2", queue="jobs", key="k")
    conn.execute("COMMIT")
    async with msgbus.connect(f"sqlite:///{tmp_path}/bus.db?max_message_size=1000") as bus:
        relay = outbox.Relay(f"sqlite:///{tmp_path}/app.db", bus)
        assert await relay.forward_once() == 3
        got = await _drain(bus.consumer("jobs"), 2)
    assert [m.body for m in got] == ["small-1", "small-2"] and relay.parked == 1
    row = conn.execute("SELECT meta, error FROM msgbus_outbox").fetchone()
    assert big.encode() in row[0] and row[1].startswith("MessageTooLarge")  # kept, with the reason


def test_staging_refuses_what_a_send_would_refuse() -> None:
    conn = sqlite3.connect(":memory:")
    outbox.create_table_sync(conn)
    with pytest.raises(ConfigError):
        outbox.stage_sync(conn, "x", queue="a b")
    with pytest.raises(ConfigError):
        outbox.stage_sync(conn, "x")  # neither queue nor topic
    with pytest.raises(ConfigError):
        outbox.stage_sync(conn, "x", queue="q", topic="t")
    with pytest.raises(InvalidMessage):
        outbox.stage_sync(conn, "x", queue="q", headers={"x-msgbus-attempts": "1"})
    with pytest.raises(InvalidMessage):
        outbox.stage_sync(conn, object(), queue="q")
    with pytest.raises(InvalidMessage):
        outbox.stage_sync(conn, "x", queue="q", key="\ud800")
    with pytest.raises(ConfigError):
        outbox.stage_sync(conn, "x", queue="q", table="orders; DROP TABLE orders")
    assert conn.execute("SELECT count(*) FROM msgbus_outbox").fetchone()[0] == 0  # none stored anything


def _relay(app: Path, bus: Path, broken: bool) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    argv = [sys.executable, str(CHILD), f"sqlite:///{app}", f"sqlite:///{bus}", *(["--broken"] if broken else [])]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _kill_relays_while_staging(
    tmp_path: Path, *, broken: bool, idle: float
) -> tuple[list[str], Counter[str], int]:
    """Stage 400 keyed messages while a relay process is SIGKILLed 4 times at random; count what arrives."""
    rng = random.Random(21)
    app, bus_path = tmp_path / "app.db", tmp_path / "bus.db"
    conn = _app(app)
    async with msgbus.connect(f"sqlite:///{bus_path}") as bus:
        sub = bus.subscriber("order-placed", subscription="audit")
        await sub.open()
        staged: list[str] = []
        kills = 0
        proc = _relay(app, bus_path, broken)
        try:
            for i in range(400):
                staged.append(_place(conn, i, f"c{i % 5}"))
                if i % 100 == 50:
                    await asyncio.sleep(rng.uniform(0.2, 0.5))  # mid-forward: it has a backlog
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    proc = _relay(app, bus_path, broken)
            got = await _drain(sub, 400, idle=idle)
        finally:
            proc.kill()
            proc.wait()
    return staged, Counter(m.id for m in got), kills


async def test_relays_killed_mid_forward_lose_nothing(tmp_path: Path) -> None:
    staged, received, kills = await _kill_relays_while_staging(tmp_path, broken=False, idle=15.0)
    lost = [i for i in staged if i not in received]
    dup = sum(received.values()) - len(received)
    print(f"{len(staged)} staged, {len(received)} received, {len(lost)} lost, {dup} dup, {kills} relays SIGKILLed")
    assert kills == 4 and not lost and set(received) == set(staged), f"{len(lost)} lost"


async def test_the_kill_test_catches_a_relay_that_deletes_before_sending(tmp_path: Path) -> None:
    staged, received, _ = await _kill_relays_while_staging(tmp_path, broken=True, idle=3.0)
    lost = [i for i in staged if i not in received]
    assert lost, "a relay that deletes rows before the bus has them must be caught losing messages"


async def test_per_key_order_is_commit_order(tmp_path: Path) -> None:
    conn = _app(tmp_path / "app.db")
    rng = random.Random(7)
    sent: dict[str, list[int]] = defaultdict(list)
    for i in range(200):
        customer = f"c{rng.randrange(6)}"
        if rng.random() < 0.1:
            _place(conn, i, customer, commit=False)
        else:
            _place(conn, i, customer)
            sent[customer].append(i)
    async with msgbus.connect(f"sqlite:///{tmp_path}/bus.db") as bus:
        sub = bus.subscriber("order-placed", subscription="audit")
        await sub.open()
        relay = outbox.Relay(f"sqlite:///{tmp_path}/app.db", bus, batch=13)
        while await relay.forward_once():
            pass
        got = await _drain(sub, sum(map(len, sent.values())))
    seen: dict[str, list[int]] = defaultdict(list)
    for m in got:
        seen[m.key or ""].append(m.body["order"])
    assert seen == sent


async def test_the_relay_command_forwards_until_sigterm_and_says_how_many(tmp_path: Path) -> None:
    conn = _app(tmp_path / "app.db")
    staged = [_place(conn, i, "c1") for i in range(10)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    async with msgbus.connect(f"sqlite:///{tmp_path}/bus.db") as bus:
        sub = bus.subscriber("order-placed", subscription="audit")
        await sub.open()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "msgbus",
            "relay",
            "--from",
            f"sqlite:///{tmp_path}/app.db",
            "--to",
            f"sqlite:///{tmp_path}/bus.db",
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        got = await _drain(sub, 10, idle=15.0)
        proc.send_signal(signal.SIGTERM)
        _, err = await proc.communicate()
    assert [m.id for m in got] == staged and proc.returncode == 0
    assert "forwarded 10 message(s), parked 0" in err.decode()


def test_the_relay_command_shows_urls_redacted(tmp_path: Path) -> None:
    from msgbus.cli import main

    done = subprocess.run(
        [sys.executable, "-m", "msgbus", "relay", "--from", "mysql://u:hunter2@h/db", "--to", "memory://"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2 and "hunter2" not in done.stderr + done.stdout
    assert "postgresql:// or sqlite:///" in done.stderr
    assert main(["relay", "--help"]) == 0
