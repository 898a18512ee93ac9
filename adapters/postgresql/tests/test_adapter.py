"""The adapter against a real PostgreSQL server, at the SPI level and through the public API: exact counts.

Failure cases first: a connection that hangs silently, the server SIGKILLed mid-stream, notifications that
never come, rows msgbus did not write, hostile names and headers, messages at and over the size limit.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

import msgbus
from msgbus.adapter import HEADER_DEAD_LETTER_REASON, Delivery, Endpoint, Receiver, Record
from msgbus.errors import ConnectionLost, MessageTooLarge, MsgbusError, TopologyError
from msgbus_postgresql import PostgresAdapter
from msgbus_postgresql._schema import FILLFACTOR, Statements

MakeAdapter = Callable[..., Awaitable[PostgresAdapter]]
QUEUE = Endpoint("queue", "jobs")


def _records(n: int, tag: str = "m", **fields: Any) -> list[Record]:
    return [Record(body=f"{tag}{i}".encode(), id=f"{tag}{i}", timestamp=1.5 + i, **fields) for i in range(n)]


async def _drain(receiver: Receiver, expected: int, *, ack: bool = True, rounds: int = 100) -> list[Delivery]:
    got: list[Delivery] = []
    for _ in range(rounds):
        if len(got) >= expected:
            break
        batch = await receiver.receive(100, 0.1)
        if ack and batch:
            await receiver.ack_many(batch)
        got += batch
    return got


async def _rows(bus: PostgresAdapter) -> int:
    assert bus.pool is not None
    return int(await bus.pool.fetchval(f'SELECT count(*) FROM "{bus.options.schema}".messages'))


async def test_round_trip_receive_bound_and_acked_rows_gone(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()
    await bus.declare(QUEUE)
    sent = _records(120, headers={"n": "1"}, key="k")
    await bus.send(QUEUE, sent[:1])
    await bus.send(QUEUE, sent[1:])
    receiver = await bus.receiver(QUEUE, prefetch=25)
    first = await receiver.receive(100, 2.0)
    assert len(first) == 1  # keyed: the next of the key waits until the first is settled
    more = await _drain(receiver, 119, ack=False, rounds=3)
    assert more == []  # never past an unsettled head of its key
    await receiver.ack_many(first)
    other = await bus.receiver(QUEUE, prefetch=25)
    unkeyed = _records(60, tag="u")
    await bus.send(QUEUE, unkeyed)
    held = await other.receive(25, 2.0)
    assert 0 < len(held) <= 25  # what it is asked for (the core keeps the prefetch limit), never more
    held += await other.receive(100, 2.0)  # no count of its own: more while the first are unsettled
    assert len(held) > 25
    await other.ack_many(held)
    got = first + held + await _drain(receiver, 180 - len(first) - len(held), rounds=400)
    assert Counter(d.record.id for d in got) == Counter(r.id for r in sent + unkeyed)  # 180 sent, 180 received, 0 dup
    assert {d.record.id: d.record for d in got} == {r.id: r for r in sent + unkeyed}
    assert all(d.attempt == 1 for d in got) and await _rows(bus) == 0


async def test_hostile_headers_keys_and_ids_round_trip(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()
    await bus.declare(QUEUE)
    nasty = "'); DROP TABLE messages; --\0\x01\u2028ünï\U0001f600"
    sent = [
        Record(body=b"\0\xff", id=nasty + str(i), headers={nasty: nasty, "": "", "a" * 300: "b" * 5000}, key=nasty)
        for i in range(3)
    ]
    await bus.send(QUEUE, sent)
    receiver = await bus.receiver(QUEUE, prefetch=10)
    got: list[Delivery] = []
    while len(got) < 3:  # one key: one at a time
        batch = await receiver.receive(10, 2.0)
        await receiver.ack_many(batch)
        got += batch
    assert [d.record for d in got] == sent


async def test_names_are_data_not_sql(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()
    names = ["a.b", "a_b", "A-b", "x" * 200, "1;drop"]
    for i, name in enumerate(names):
        await bus.declare(Endpoint("queue", name))
        await bus.send(Endpoint("queue", name), _records(i + 1, tag=name))
    for i, name in enumerate(names):
        got = await _drain(await bus.receiver(Endpoint("queue", name), prefetch=10), i + 1)
        assert sorted(d.record.id for d in got) == sorted(r.id for r in _records(i + 1, tag=name))


async def test_a_message_over_the_limit_is_refused_and_stores_nothing(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter(max_message_size=10_000)
    await bus.declare(QUEUE)
    at_limit = Record(body=b"\0" * (10_000 - 8), id="at-limit")
    assert at_limit.size() == 10_000
    await bus.send(QUEUE, [at_limit])
    with pytest.raises(MessageTooLarge):
        await bus.send(QUEUE, [*_records(2, tag="ok"), Record(body=b"\0" * 10_000, id="over")])
    got = await _drain(await bus.receiver(QUEUE, prefetch=5), 1)
    assert [d.record.id for d in got] == ["at-limit"] and await _rows(bus) == 0


async def _woken_by_another_adapter(make_adapter: MakeAdapter) -> list[Delivery]:
    """A receiver that would not poll for a minute waits 5 s while another adapter sends after 1.5 s.

    The send must come after the receiver's last look at the table (a lease, then the next visible row), which
    takes a few hundred ms on a loaded machine: hence 1.5 s.
    """
    waiting = await make_adapter(poll_interval=60)
    other = await make_adapter()  # another pool and listener: as another process would be
    await waiting.declare(QUEUE)
    # The listener's first connect wakes every receiver (notifications before it were lost): let it happen first.
    await asyncio.wait_for(waiting._listening.wait(), 30)
    receiver = await waiting.receiver(QUEUE, prefetch=5)
    assert await receiver.receive(5, 0.2) == []

    async def send_soon() -> None:
        await asyncio.sleep(1.5)
        await other.send(QUEUE, _records(1))

    sender = asyncio.create_task(send_soon())
    got = await receiver.receive(5, 5.0)  # within one wait: only a NOTIFY can end it before 60 s
    await sender
    return got


async def test_a_notification_wakes_a_consumer_that_would_not_poll_for_a_minute(make_adapter: MakeAdapter) -> None:
    assert [d.record.id for d in await _woken_by_another_adapter(make_adapter)] == ["m0"]


async def test_the_wake_test_catches_notifications_that_reach_no_receiver(
    make_adapter: MakeAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PostgresAdapter, "_notified", lambda *args: None)  # mutation: NOTIFYs go unheard
    assert await _woken_by_another_adapter(make_adapter) == []


async def test_a_lost_notification_is_made_up_by_the_bounded_poll(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter(poll_interval=0.3)
    await bus.declare(QUEUE)
    receiver = await bus.receiver(QUEUE, prefetch=5)
    assert await receiver.receive(5, 0.2) == []
    quiet = Statements.for_schema(bus.options.schema, "nobody_listens")  # its NOTIFYs reach no consumer
    target = bus._ids[("queue", "jobs", "", False)]
    assert bus.pool is not None

    async def insert_silently() -> None:
        await asyncio.sleep(0.5)
        await bus.pool.execute(quiet.insert_queue, target, 0.0, [None], [b"x"], [b'["silent", {}, null, null, 1]'])

    writer = asyncio.create_task(insert_silently())
    got = await receiver.receive(5, 5.0)
    await writer
    assert [d.record.id for d in got] == ["silent"]


async def test_a_row_msgbus_did_not_write_is_dead_lettered_and_the_consumer_goes_on(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()
    await bus.declare(QUEUE)
    target = await bus._endpoint_id(("queue", "jobs", "", False), create=False, what=QUEUE)
    assert bus.pool is not None
    await bus.pool.execute(bus.sql.insert_queue, target, 0.0, [None, None], [b"junk", b"more"], [b"{not json", b"[]"])
    await bus.send(QUEUE, _records(2))
    got = await _drain(await bus.receiver(QUEUE, prefetch=10), 2)
    assert sorted(d.record.id for d in got) == ["m0", "m1"]
    dead = await _drain(await bus.receiver(Endpoint("queue", "jobs", dead_letter=True), prefetch=10), 2)
    assert sorted(d.record.body for d in dead) == [b"junk", b"more"]
    assert all(d.record.headers[HEADER_DEAD_LETTER_REASON].startswith("DecodeError") for d in dead)


async def test_deliveries_to_consumers_that_vanished_are_counted(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter(visibility_timeout=0.3)
    await bus.declare(QUEUE)
    await bus.send(QUEUE, _records(3))
    for attempt in (1, 2, 3):
        doomed = await bus.receiver(QUEUE, prefetch=10)
        got = await _drain(doomed, 3, ack=False)
        assert sorted(d.attempt for d in got) == [attempt] * 3
        await doomed.close()  # gone without settling, as a killed consumer
        await asyncio.sleep(0.4)


async def test_a_stops_hand_back_counts_no_attempt_and_a_stale_handle_is_harmless(make_adapter: MakeAdapter) -> None:
    """``release_many`` (a stopping consumer's buffer, from two leases): back at once with the attempt each had;
    the released handles settle nothing afterwards."""
    bus = await make_adapter()
    await bus.declare(QUEUE)
    await bus.send(QUEUE, _records(3))
    r = await bus.receiver(QUEUE, prefetch=10)
    (first,) = await r.receive(1, 5.0)
    await first.nack()
    held = [*await r.receive(1, 5.0), *await _drain(r, 2, ack=False)]
    assert sorted((d.record.id, d.attempt) for d in held) == [("m0", 2), ("m1", 1), ("m2", 1)]
    await r.release_many(held)
    for d in held:
        await d.ack()  # already given back: a stale handle
    again = await _drain(r, 3, ack=False)
    assert sorted((d.record.id, d.attempt) for d in again) == [("m0", 2), ("m1", 1), ("m2", 1)]


async def test_a_lease_rewrites_rows_in_place_even_on_a_table_an_earlier_version_made(
    make_adapter: MakeAdapter,
) -> None:
    """Leases are HOT updates (no index entry written): the table keeps room on each page for the new versions
    of every row a lease takes. A table made at the earlier fillfactor (80) is set to the new one on open."""
    first = await make_adapter()
    await first.declare(QUEUE)
    assert first.pool is not None
    table = f'"{first.options.schema}".messages'
    await first.pool.execute(f"ALTER TABLE {table} SET (fillfactor = 80)")  # as an earlier version made it
    bus = await make_adapter()
    await bus.declare(QUEUE)
    assert bus.pool is not None
    assert f"fillfactor={FILLFACTOR}" in await bus.pool.fetchval(
        "SELECT reloptions FROM pg_class WHERE oid = $1::regclass", table
    )
    await bus.send(QUEUE, [Record(body=b"x" * 1024, id=f"m{i}") for i in range(64)])
    sql = Statements.for_schema(bus.options.schema, bus.options.channel)
    async with bus.pool.acquire() as conn, conn.transaction():  # counted for this transaction only
        endpoint = await conn.fetchval(
            f'SELECT id FROM "{bus.options.schema}".endpoints WHERE name = $1 AND NOT dead_letter', QUEUE.name
        )
        assert len(await conn.fetch(sql.lease, endpoint, 64, 1, 30.0)) == 64
        updated, hot = await conn.fetchrow(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relid = $1::regclass", table
        )
    assert (updated, hot) == (64, 64)


async def test_verify_mode_finds_missing_tables_and_endpoints(make_adapter: MakeAdapter) -> None:
    bus = await make_adapter()
    with pytest.raises(TopologyError, match="tables"):
        await bus.declare(QUEUE, create=False)
    await bus.declare(Endpoint("queue", "other"))
    for endpoint in (QUEUE, Endpoint("topic", "nope", "sub"), Endpoint("topic", "nope")):
        with pytest.raises(TopologyError):
            await bus.declare(endpoint, create=False)
    await bus.declare(QUEUE)
    await bus.declare(QUEUE, create=False)


async def test_a_silent_connection_fails_in_bounded_time_and_is_replaced(
    make_adapter: MakeAdapter,
    proxied: tuple[Any, str],  # a SilentProxy (integration/_proxy.py), and the URL through it
) -> None:
    proxy, url = proxied
    bus = await make_adapter(url, command_timeout=1, connect_timeout=1, reconnect_timeout=2, keepalive_interval=0.5)
    await bus.declare(QUEUE)
    receiver = await bus.receiver(QUEUE, prefetch=10)
    await bus.send(QUEUE, _records(1, tag="before"))
    assert [d.record.id for d in await _drain(receiver, 1)] == ["before0"]
    proxy.silent = True
    async with asyncio.timeout(8):  # command_timeout 1 s, retried for reconnect_timeout 2 s: no hang
        with pytest.raises(ConnectionLost):
            await bus.send(QUEUE, _records(1, tag="lost"))
    proxy.silent = False
    await bus.send(QUEUE, _records(5, tag="after"))  # fresh connections through the recovered link
    got = await _drain(receiver, 5, rounds=50)
    assert {d.record.id for d in got} >= {f"after{i}" for i in range(5)}


@pytest.mark.usefixtures("make_adapter")  # its cleanup drops this test's schema
async def test_server_killed_mid_stream_loses_nothing_sent(pg_url: str, schema: str) -> None:
    """Sends and a consumer run while the server is SIGKILLed and restarted: every send that returned arrives."""
    from integration import brokers

    broker = brokers.endpoint("postgresql")
    if broker.handle is None:
        pytest.skip("the PostgreSQL endpoint came from the environment: not ours to restart")
    bus = msgbus.connect(f"{pg_url}?visibility_timeout=2&schema={schema}")
    received: Counter[str] = Counter()
    sent: list[str] = []
    failed = 0
    async with bus:
        consumer = bus.consumer("restarts")

        async def handle(msg: msgbus.Message[Any]) -> None:
            received[msg.id] += 1

        task = asyncio.create_task(consumer.run(handle, concurrency=4))
        producer = bus.producer("restarts")

        async def send_all() -> None:
            nonlocal failed
            for i in range(600):
                try:
                    sent.append(await producer.send({"i": i}))
                except MsgbusError:
                    failed += 1

        sender = asyncio.create_task(send_all())
        while len(sent) < 150:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(broker.restart, hard=True)
        await sender
        async with asyncio.timeout(60):
            while not set(sent) <= set(received):
                await asyncio.sleep(0.1)
        consumer.stop()
        await task
    assert failed == 0  # sends retried on fresh connections instead of raising
    assert set(received) == set(sent) and len(sent) == 600  # 600 sent, 600 received, 0 lost (dups reported below)
    print(f"duplicates after the restart: {sum(received.values()) - len(received)}")


def test_adapter_page_names_every_option() -> None:
    from pathlib import Path

    from msgbus_postgresql._config import PostgresOptions

    page = (Path(__file__).resolve().parents[3] / "docs" / "adapters" / "postgresql.md").read_text()
    options = set(PostgresOptions.__dataclass_fields__) - {"host", "port", "user", "password", "database"}
    missing = [o for o in sorted(options) if f"`{o}`" not in page]
    assert not missing, f"docs/adapters/postgresql.md does not document {missing}"


async def test_the_pool_never_holds_more_than_pool_size(make_adapter: MakeAdapter, pg_url: str) -> None:
    bus = await make_adapter(pool_size=2)
    await bus.declare(QUEUE)
    await asyncio.gather(*(bus.send(QUEUE, _records(1, tag=f"c{i}-")) for i in range(40)))
    conn = await asyncpg.connect(pg_url)
    try:
        mine = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'msgbus'")
    finally:
        await conn.close()
    assert mine <= 3  # 2 pooled + 1 listening (other adapters of this test: none)
