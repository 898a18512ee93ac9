"""Exactly-once effects through a real broker: the outbox relay and service B's consumer die at random.

Service A (this test) writes order rows and stages their events in one PostgreSQL transaction, rolling back
one in ten. ``msgbus relay`` forwards the outbox to the middle broker; service B (``_outbox_service``) applies
each event once through the PostgreSQL inbox. Both are SIGKILLed and restarted three times while A writes.
At the end every committed order has exactly one effect in B's table, and no rolled-back order has any.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from integration.brokers import endpoint
from msgbus import outbox

ROOT = Path(__file__).resolve().parents[1]
ORDERS = 300
KILLS = 3  # of the relay, and of the consumer


def _middle(name: str) -> str:
    if name == "kafka":  # a killed consumer's partitions move on after 3 s, not Kafka's 45
        return f"{endpoint('kafka').url}?session_timeout=3&heartbeat_interval=0.3&visibility_timeout=5"
    if name == "sqs":
        from integration.test_contract_sqs import contract_url

        return contract_url()
    return endpoint(name).url


class _Process:
    """A child process of this test, restarted after each SIGKILL; its URLs travel in the environment."""

    def __init__(self, argv: list[str], env: dict[str, str], ready: str | None) -> None:
        self.argv, self.env, self.ready = argv, env, ready
        self.kills = 0
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT)}
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        if self.ready is not None:
            assert self.proc.stdout is not None
            async with asyncio.timeout(60):
                while (await self.proc.stdout.readline()).decode().strip() != self.ready:
                    assert self.proc.returncode is None, f"{self.argv} exited with {self.proc.returncode}"

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self.kills += 1
        await self.start()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def _service_a(pool: asyncpg.Pool, run: str, queue: str, table: str) -> tuple[set[int], set[int]]:
    """ORDERS transactions from 4 writers: the order row and its event, one in ten rolled back after staging."""
    committed: set[int] = set()
    rolled_back: set[int] = set()
    rng = random.Random(run)

    class Rollback(Exception):
        pass

    async def writer(orders: range) -> None:
        for order in orders:
            try:
                async with pool.acquire() as conn, conn.transaction():
                    customer = f"c{order % 7}"
                    await conn.execute("INSERT INTO e2e_orders (run, order_id) VALUES ($1, $2)", run, order)
                    await outbox.stage(conn, {"order": order}, queue=queue, key=customer, table=table)
                    if rng.random() < 0.1:
                        raise Rollback
            except Rollback:
                rolled_back.add(order)
            else:
                committed.add(order)
            await asyncio.sleep(rng.uniform(0, 0.06))

    await asyncio.gather(*(writer(range(w, ORDERS, 4)) for w in range(4)))
    return committed, rolled_back


@pytest.mark.parametrize("middle", ["kafka", "rabbitmq", "sqs"])
async def test_every_committed_order_has_exactly_one_effect(middle: str) -> None:
    db = endpoint("postgresql").url
    bus_url = _middle(middle)
    run = uuid.uuid4().hex[:12]
    queue, table = f"e2e-{run}", f"e2e_outbox_{run}"
    pool = await asyncpg.create_pool(db, min_size=1, max_size=8)
    await pool.execute(
        "CREATE TABLE IF NOT EXISTS e2e_orders (run text, order_id int);"
        "CREATE TABLE IF NOT EXISTS e2e_effects (run text, order_id int, message_id text)"
    )
    async with pool.acquire() as conn:
        await outbox.create_table(conn, table)
    relay = _Process(
        [sys.executable, "-m", "msgbus", "relay", "--from", db, "--to", bus_url, "--table", table], {}, None
    )
    service = _Process(
        [sys.executable, "-m", "integration._outbox_service"],
        {"MSGBUS_URL": bus_url, "E2E_DB": db, "E2E_QUEUE": queue, "E2E_RUN": run},
        "READY",
    )
    await service.start()  # declares the queue before anything is forwarded to it
    await relay.start()
    rng = random.Random(run)
    try:
        writing = asyncio.create_task(_service_a(pool, run, queue, table))

        async def chaos(process: _Process) -> None:
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(1.0, 3.0))
                await process.kill()

        await asyncio.gather(chaos(relay), chaos(service))
        committed, rolled_back = await writing
        count = "SELECT count(*) FROM e2e_effects WHERE run = $1"
        async with asyncio.timeout(120):
            while await pool.fetchval(count, run) < len(committed):
                await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)  # a late double application would land by now
    finally:
        await relay.stop()
        await service.stop()
    rows = await pool.fetch("SELECT order_id, count(*) AS n FROM e2e_effects WHERE run = $1 GROUP BY order_id", run)
    applied = {r["order_id"]: r["n"] for r in rows}
    left = await pool.fetchval(f"SELECT count(*) FROM {table}")
    await pool.execute(f"DROP TABLE {table}")
    await pool.close()
    lost = committed - set(applied)
    twice = {o for o, n in applied.items() if n > 1}
    phantom = set(applied) & rolled_back
    print(
        f"\n{middle}: {ORDERS} transactions, {len(committed)} committed, {len(rolled_back)} rolled back; relay and "
        f"consumer SIGKILLed {relay.kills} and {service.kills} times; {len(applied)} applied, {len(lost)} lost, "
        f"{len(twice)} applied twice, {len(phantom)} from rolled-back transactions, {left} left in the outbox"
    )
    assert relay.kills == service.kills == KILLS
    assert not lost and not twice and not phantom and set(applied) == committed and left == 0
