"""The outbox and the inbox on PostgreSQL: staging in the caller's transaction, commit order per key, the
relay's take-over, and the inbox under concurrent copies of one message."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from asyncpg.exceptions import InternalClientError

import msgbus
from integration.brokers import endpoint
from msgbus import outbox
from msgbus.errors import ConfigError
from msgbus.inbox import PostgresInbox


@pytest.fixture
async def db() -> AsyncIterator[tuple[str, asyncpg.Pool, str]]:
    url = endpoint("postgresql").url
    pool = await asyncpg.create_pool(url, min_size=1, max_size=6)
    table = f"t_outbox_{uuid.uuid4().hex[:10]}"
    async with pool.acquire() as conn:
        await outbox.create_table(conn, table)
    yield url, pool, table
    for _ in range(5):  # idle connections may be dead after a test restarted the server
        try:
            await pool.execute(f"DROP TABLE IF EXISTS {table}")
            break
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresError):
            await asyncio.sleep(0.2)
    await pool.close()


async def _forwarded(url: str, table: str, bus: msgbus.Bus, queue: str, want: int) -> list[msgbus.Message[Any]]:
    relay = outbox.Relay(url, bus, table=table)
    while await relay.forward_once():
        pass
    consumer = bus.consumer(queue)
    got: list[msgbus.Message[Any]] = []
    while len(got) < want:
        batch = await consumer.receive(max_messages=100, timeout=2.0)
        assert batch, f"{len(got)} of {want} forwarded"
        for m in batch:
            await m.ack()
        got += batch
    return got


async def test_staging_needs_the_callers_transaction_and_rolls_back_with_it(db: tuple[str, asyncpg.Pool, str]) -> None:
    url, pool, table = db
    async with pool.acquire() as conn:
        with pytest.raises(ConfigError, match="inside the transaction"):
            await outbox.stage(conn, "x", queue="q", table=table)
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await outbox.stage(conn, "rolled back", queue="q", table=table)
                raise RuntimeError("the service's own write failed")
        async with conn.transaction():
            kept = await outbox.stage(conn, {"n": 1}, queue="q", table=table, key="k", headers={"h": "v"})
    async with msgbus.connect("memory://") as bus:
        [msg] = await _forwarded(url, table, bus, "q", 1)
    assert (msg.id, msg.body, msg.key, dict(msg.headers)) == (kept, {"n": 1}, "k", {"h": "v"})
    assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0


async def _two_writers_of_one_key(url: str, pool: asyncpg.Pool, table: str) -> tuple[list[str], list[str]]:
    """T1 stages key k first but commits 0.3 s later than T2 would: the forwarded order must be commit order."""
    committed: list[str] = []
    first_staged = asyncio.Event()

    async def t1() -> None:
        async with pool.acquire() as conn:
            async with conn.transaction():
                await outbox.stage(conn, "t1", queue="q", key="k", table=table)
                first_staged.set()
                await asyncio.sleep(0.3)
            committed.append("t1")

    async def t2() -> None:
        await first_staged.wait()
        async with pool.acquire() as conn:
            async with conn.transaction():
                await outbox.stage(conn, "t2", queue="q", key="k", table=table)
            committed.append("t2")

    await asyncio.gather(t1(), t2())
    async with msgbus.connect("memory://") as bus:
        got = await _forwarded(url, table, bus, "q", 2)
    return committed, [m.body for m in got]


async def test_one_keys_messages_are_forwarded_in_commit_order(db: tuple[str, asyncpg.Pool, str]) -> None:
    committed, forwarded = await _two_writers_of_one_key(*db)
    assert forwarded == committed == ["t1", "t2"]  # T2 waited for T1's key lock


async def test_the_order_test_catches_staging_without_the_key_lock(
    db: tuple[str, asyncpg.Pool, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox, "_KEY_LOCK_SQL", "SELECT $1::bigint")  # mutation: no per-key lock
    committed, forwarded = await _two_writers_of_one_key(*db)
    assert committed == ["t2", "t1"] and forwarded == ["t1", "t2"]  # insert order, not commit order: caught


async def test_a_second_relay_waits_and_takes_over_when_the_first_dies(db: tuple[str, asyncpg.Pool, str]) -> None:
    url, pool, table = db
    async with pool.acquire() as conn, conn.transaction():
        for i in range(5):
            await outbox.stage(conn, i, queue="q", table=table)
    async with msgbus.connect("memory://") as bus:
        first, second = outbox.Relay(url, bus, table=table), outbox.Relay(url, bus, table=table)
        holder = outbox._source(url, table)
        assert await holder.open(asyncio.Event())  # a relay holding the table (the lock), forwarding nothing
        stop = asyncio.Event()
        waiting = asyncio.create_task(first.run(stop))
        await asyncio.sleep(1.5)
        assert first.forwarded == 0  # it waits while another relay holds the table
        await holder.close()  # the holder dies: its session's lock goes with it
        async with asyncio.timeout(10):
            while first.forwarded < 5:
                await asyncio.sleep(0.05)
        stop.set()
        await waiting
        assert second.forwarded == 0
        got = await bus.consumer("q").receive(max_messages=10, timeout=1)
    assert sorted(m.body for m in got) == [0, 1, 2, 3, 4]


async def test_the_inbox_applies_concurrent_copies_of_one_id_once(db: tuple[str, asyncpg.Pool, str]) -> None:
    _, pool, _ = db
    name = f"billing-{uuid.uuid4().hex[:8]}"
    await pool.execute("CREATE TABLE IF NOT EXISTS t_effects (inbox text, message_id text)")
    inbox = PostgresInbox(pool, name=name, table="t_inbox")
    calls = 0

    async def apply(msg: msgbus.Message[Any]) -> None:
        nonlocal calls
        calls += 1
        await inbox.connection().execute("INSERT INTO t_effects VALUES ($1, $2)", name, msg.id)
        await asyncio.sleep(0.05)  # copies of this id are in other handlers meanwhile
        if msg.attempt == 1 and msg.body % 5 == 0:
            raise RuntimeError("fails after writing: rolled back with the id")

    async with msgbus.connect("memory://") as bus:
        producer = bus.producer("orders")
        for i in range(20):
            for _ in range(3):
                await producer.send(i, message_id=f"order-{i}")
        consumer = bus.consumer("orders", retry=msgbus.RetryPolicy(initial_backoff=0.01, jitter=0))
        task = asyncio.create_task(consumer.run(apply, concurrency=8, middleware=[inbox]))
        async with asyncio.timeout(30):
            while inbox.duplicates < 40:  # every copy ends applied (20) or skipped as a duplicate (40)
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        consumer.stop()
        await task
    rows = await pool.fetch("SELECT message_id, count(*) FROM t_effects WHERE inbox = $1 GROUP BY message_id", name)
    assert sorted((r[0], r[1]) for r in rows) == sorted((f"order-{i}", 1) for i in range(20))  # 60 copies, 20 effects
    assert inbox.duplicates == 40 and calls >= 20


async def test_psycopg_connections_stage_too(db: tuple[str, asyncpg.Pool, str]) -> None:
    import psycopg

    url, _, table = db
    async with await psycopg.AsyncConnection.connect(url) as conn:
        async with conn.transaction():
            first = await outbox.stage(conn, "async", queue="q", key="k", table=table)
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await outbox.stage(conn, "rolled back", queue="q", table=table)
                raise RuntimeError("the service's own write failed")
    with psycopg.connect(url) as sync:  # not autocommit: psycopg has begun a transaction, commit ends it
        second = outbox.stage_sync(sync, "sync", queue="q", key="k", table=table)
        sync.commit()
    with psycopg.connect(url, autocommit=True) as loose, pytest.raises(ConfigError, match="inside the transaction"):
        outbox.stage_sync(loose, "no transaction", queue="q", table=table)
    async with msgbus.connect("memory://") as bus:
        got = await _forwarded(url, table, bus, "q", 2)
    assert [(m.id, m.body) for m in got] == [(first, "async"), (second, "sync")]


async def test_the_relay_rides_out_postgresql_being_killed(db: tuple[str, asyncpg.Pool, str]) -> None:
    """Staging and forwarding go on while the server is SIGKILLed: every committed message arrives once or more."""
    url, pool, table = db
    broker = endpoint("postgresql")
    if broker.handle is None:
        pytest.skip("the PostgreSQL endpoint came from the environment: not ours to restart")
    committed: list[str] = []
    uncertain: list[str] = []  # raised around the commit: it may or may not have committed
    async with msgbus.connect("memory://") as bus:
        consumer = bus.consumer("q")
        await consumer.open()
        relay = outbox.Relay(url, bus, table=table, poll_interval=0.2)
        stop = asyncio.Event()
        relaying = asyncio.create_task(relay.run(stop))

        async def stage_all() -> None:
            for i in range(300):
                try:
                    async with pool.acquire() as conn, conn.transaction():
                        await outbox.stage(conn, i, queue="q", key=f"k{i % 3}", table=table, message_id=f"m{i}")
                    committed.append(f"m{i}")
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, InternalClientError):
                    uncertain.append(f"m{i}")
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.005)

        staging = asyncio.create_task(stage_all())
        while len(committed) < 100:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(broker.restart, hard=True)
        await staging
        got: dict[str, int] = {}
        async with asyncio.timeout(60):
            while not set(committed) <= set(got):
                for m in await consumer.receive(max_messages=100, timeout=0.5):
                    got[m.id] = got.get(m.id, 0) + 1
                    await m.ack()
        stop.set()
        await relaying
    print(
        f"\n{len(committed)} committed, {len(uncertain)} raised during the restart, {len(got)} received, "
        f"{sum(got.values()) - len(got)} dup"
    )
    assert set(committed) <= set(got) <= set(committed) | set(uncertain)  # 0 lost, nothing never staged
