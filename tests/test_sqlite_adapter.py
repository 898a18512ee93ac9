"""The sqlite:// adapter at the SPI level: delivery semantics on a real database file, exact counts."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from msgbus import _sqlite
from msgbus._url import parse_url
from msgbus.adapter import (
    HEADER_ATTEMPTS,
    HEADER_DEAD_LETTER_REASON,
    HEADER_DEAD_LETTER_SOURCE,
    Adapter,
    Delivery,
    Endpoint,
    Receiver,
    Record,
)
from msgbus.errors import ClosedError, ConfigError, ConnectionLost, MessageTooLarge, TopologyError

Q = Endpoint("queue", "work")
DLQ = Endpoint("queue", "work", dead_letter=True)
TOPIC = Endpoint("topic", "events")


def make(url: str, **options: object) -> Adapter:
    parsed = parse_url(url)
    reader = parsed.reader(options)
    adapter = _sqlite.create(parsed, reader)
    reader.finish()
    return adapter


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/bus.db"


@pytest.fixture
async def adapter(db_url: str) -> AsyncIterator[Adapter]:
    a = make(db_url, visibility_timeout=0.5, poll_interval=0.01)
    await a.open()
    yield a
    await a.close()


def rec(i: int, key: str | None = None, **headers: str) -> Record:
    return Record(body=str(i).encode(), id=f"m{i}", headers=headers, key=key)


def bodies(ds: list[Delivery]) -> list[int]:
    return [int(d.record.body) for d in ds]


async def drain(receiver: Receiver, want: int, timeout: float = 10.0) -> list[Delivery]:
    """Receive (and ack) until ``want`` deliveries arrived or nothing comes for ``timeout`` seconds."""
    got: list[Delivery] = []
    while len(got) < want:
        batch = await receiver.receive(100, timeout)
        if not batch:
            break
        got += batch
        await receiver.ack_many(batch)
    return got


# --- URL and options -------------------------------------------------------------------------------------


def test_url_paths_relative_to_cwd_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert _sqlite.database_path(parse_url("sqlite:///./msgbus.db")) == str(tmp_path / "msgbus.db")
    assert _sqlite.database_path(parse_url("sqlite:///sub/bus.db")) == str(tmp_path / "sub" / "bus.db")
    assert _sqlite.database_path(parse_url("sqlite:////abs/path.db")) == "/abs/path.db"


@pytest.mark.parametrize(
    "url", ["sqlite://host/x.db", "sqlite://", "sqlite:///", "sqlite:///dir/", "sqlite:///:memory:"]
)
def test_bad_urls_raise_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        make(url)


def test_options_are_typed_and_capabilities_declared(db_url: str) -> None:
    a = make(db_url, visibility_timeout=7, max_message_size=2048, synchronous="full")
    caps = a.capabilities
    assert (caps.ordering, caps.lock_duration, caps.max_message_size, caps.persistence) == (
        "per_key",
        7.0,
        2048,
        "disk",
    )
    assert caps.delayed_delivery and caps.delayed_nack and caps.native_dead_letter and caps.lock_extension
    assert caps.cross_process and not caps.restartable
    with pytest.raises(ConfigError, match="synchronous"):
        make(db_url, synchronous="off")
    with pytest.raises(ConfigError, match="visibility_timeout"):
        make(db_url, visibility_timeout="soon")


async def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    a = make(f"sqlite:///{tmp_path}/no/such/dir/bus.db")
    with pytest.raises(ConfigError, match="does not exist"):
        await a.open()
    await a.close()


async def test_a_file_that_is_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "notes.db").write_bytes(b"these are not the pages you are looking for" * 200)
    a = make(f"sqlite:///{tmp_path}/notes.db")
    with pytest.raises(ConfigError, match="not a SQLite database") as info:
        await a.open()
    assert info.value.__cause__ is not None  # the sqlite3 error is kept as the cause, never leaked bare
    await a.close()


async def test_a_directory_as_database_is_connection_lost(tmp_path: Path) -> None:
    (tmp_path / "adir.db").mkdir()
    a = make(f"sqlite:///{tmp_path}/adir.db")
    with pytest.raises(ConnectionLost):
        await a.open()
    await a.close()


async def test_use_after_close_raises_closed(adapter: Adapter) -> None:
    await adapter.declare(Q)
    await adapter.close()
    await adapter.close()  # idempotent
    with pytest.raises(ClosedError):
        await adapter.send(Q, [rec(1)])


# --- delivery semantics ----------------------------------------------------------------------------------


async def test_fifo_and_every_field_round_trips(adapter: Adapter) -> None:
    await adapter.declare(Q)
    sent = [
        Record(
            body=bytes([i]) * 10,
            id=f"id-{i}",
            headers={"h": str(i), "ünï": "cødé"},
            correlation_id=f"c{i}",
            content_type="application/octet-stream",
            timestamp=1000.5 + i,
        )
        for i in range(50)
    ]
    await adapter.send(Q, sent[:20])
    await adapter.send(Q, sent[20:])
    r = await adapter.receiver(Q, prefetch=100)
    got = await r.receive(100, 1.0)
    assert [d.record for d in got] == sent
    assert {d.attempt for d in got} == {1}
    await r.ack_many(got)
    assert await r.receive(10, 0.05) == []


async def test_receive_returns_at_most_max(adapter: Adapter) -> None:
    await adapter.declare(Q)
    await adapter.send(Q, [rec(i) for i in range(10)])
    r = await adapter.receiver(Q, prefetch=4)
    first = await r.receive(3, 1.0)
    # No count of its own (the consumer's inbox keeps the prefetch limit): the rest, though 3 are unsettled.
    second = await r.receive(10, 1.0)
    assert (bodies(first), bodies(second)) == ([0, 1, 2], list(range(3, 10)))
    assert await r.receive(10, 0.05) == []


async def test_ack_nack_and_attempts(adapter: Adapter) -> None:
    await adapter.declare(Q)
    await adapter.send(Q, [rec(1), rec(2)])
    r = await adapter.receiver(Q, prefetch=10)
    one, two = await r.receive(10, 1.0)
    await one.ack()
    await two.nack()
    again = await r.receive(10, 1.0)
    assert [(d.record.id, d.attempt) for d in again] == [("m2", 2)]
    await again[0].nack()
    third = await r.receive(10, 1.0)
    assert [(d.record.id, d.attempt) for d in third] == [("m2", 3)]
    await third[0].ack()
    assert await r.receive(10, 0.05) == []


async def test_a_stops_hand_back_counts_no_attempt_and_a_stale_handle_is_harmless(adapter: Adapter) -> None:
    """``release_many`` (a stopping consumer's buffer): back at once with the attempt it had, a nack's count not
    added; the released handles settle nothing afterwards."""
    await adapter.declare(Q)
    await adapter.send(Q, [rec(1), rec(2), rec(3)])
    r = await adapter.receiver(Q, prefetch=10)
    first = await r.receive(1, 1.0)
    await first[0].nack()
    held = await r.receive(10, 1.0)  # m1 at attempt 2, m2 and m3 at attempt 1
    assert sorted((d.record.id, d.attempt) for d in held) == [("m1", 2), ("m2", 1), ("m3", 1)]
    await r.release_many(held)
    for d in held:
        await d.ack()  # already given back: a stale handle
    again = await r.receive(10, 1.0)
    assert sorted((d.record.id, d.attempt) for d in again) == [("m1", 2), ("m2", 1), ("m3", 1)]


async def test_nack_with_delay_holds_the_message_back(adapter: Adapter) -> None:
    await adapter.declare(Q)
    await adapter.send(Q, [rec(1)])
    r = await adapter.receiver(Q, prefetch=10)
    (d,) = await r.receive(1, 1.0)
    await d.nack(delay=60)
    assert await r.receive(1, 0.1) == []
    await adapter.send(Q, [rec(2)])
    assert bodies(await r.receive(10, 1.0)) == [2]


async def test_delayed_send(adapter: Adapter) -> None:
    await adapter.declare(Q)
    await adapter.send(Q, [rec(1)], delay=60)
    await adapter.send(Q, [rec(2)], delay=0.2)
    await adapter.send(Q, [rec(3)])
    r = await adapter.receiver(Q, prefetch=10)
    assert bodies(await r.receive(10, 1.0)) == [3]
    assert bodies(await r.receive(10, 5.0)) == [2]
    assert await r.receive(10, 0.1) == []


async def test_expired_lease_redelivers_and_stale_handle_cannot_touch_it(adapter: Adapter) -> None:
    await adapter.declare(Q)
    await adapter.send(Q, [rec(1)])
    r = await adapter.receiver(Q, prefetch=10)
    (stale,) = await r.receive(1, 1.0)
    (fresh,) = await r.receive(1, 5.0)  # comes back once the 0.5 s lease runs out
    assert (fresh.record.id, fresh.attempt) == ("m1", 2)
    await stale.ack()  # lease token no longer matches: does nothing
    await stale.dead_letter("stale")
    await fresh.nack()
    (third,) = await r.receive(1, 1.0)
    assert (third.record.id, third.attempt) == ("m1", 3)
    await third.ack()
    dl = await adapter.receiver(DLQ, prefetch=10)
    assert await dl.receive(10, 0.05) == []


async def test_extend_keeps_the_message_leased(adapter: Adapter) -> None:
    await adapter.declare(Q)
    await adapter.send(Q, [rec(1)])
    r = await adapter.receiver(Q, prefetch=10)
    (d,) = await r.receive(1, 1.0)
    await d.extend(60)
    assert await r.receive(1, 1.0) == []  # twice the 0.5 s visibility timeout, still ours
    await d.ack()
    assert await r.receive(1, 0.05) == []


async def test_dead_letter_keeps_body_headers_and_says_why(adapter: Adapter) -> None:
    await adapter.declare(Q)
    await adapter.send(Q, [Record(b"payload", "m1", {"trace": "abc"}, key="k1"), rec(2)])
    r = await adapter.receiver(Q, prefetch=10)
    first, second = await r.receive(10, 1.0)
    await first.nack()
    (first,) = await r.receive(10, 1.0)
    await first.dead_letter("ValueError: bad order")
    await second.dead_letter("second")
    assert await r.receive(10, 0.05) == []

    dl = await adapter.receiver(DLQ, prefetch=10)
    a, b = await dl.receive(10, 1.0)
    assert (a.record.body, a.record.id, a.record.key, a.attempt) == (b"payload", "m1", "k1", 1)
    assert dict(a.record.headers) == {
        "trace": "abc",
        HEADER_DEAD_LETTER_REASON: "ValueError: bad order",
        HEADER_ATTEMPTS: "2",
        HEADER_DEAD_LETTER_SOURCE: "queue:work",
    }
    assert b.record.id == "m2"
    # Dead-lettering from the dead-letter destination stores it again at its end.
    await a.dead_letter("still bad")
    await b.ack()
    (again,) = await dl.receive(10, 1.0)
    assert again.record.id == "m1"
    assert again.record.headers[HEADER_DEAD_LETTER_REASON] == "still bad"
    assert again.record.headers["trace"] == "abc"
    await again.ack()
    assert await dl.receive(10, 0.05) == []


async def test_fan_out_to_subscriptions_declared_before_the_publish(adapter: Adapter) -> None:
    await adapter.declare(TOPIC)
    await adapter.send(TOPIC, [rec(0)])  # no subscription yet: dropped
    subs = [Endpoint("topic", "events", subscription=name) for name in ("billing", "audit")]
    for sub in subs:
        await adapter.declare(sub)
    await adapter.send(TOPIC, [rec(i) for i in range(1, 101)])
    late = Endpoint("topic", "events", subscription="late")
    await adapter.declare(late)
    await adapter.send(TOPIC, [rec(101)])
    for sub in subs:
        got = await drain(await adapter.receiver(sub, prefetch=200), 101)
        assert bodies(got) == list(range(1, 102))
    assert bodies(await drain(await adapter.receiver(late, prefetch=10), 1)) == [101]
    # A subscription's dead letters are its own.
    r = await adapter.receiver(late, prefetch=10)
    await adapter.send(TOPIC, [rec(102)])
    (d,) = await r.receive(1, 1.0)
    await d.dead_letter("nope")
    audit_dl = await adapter.receiver(Endpoint("topic", "events", "audit", dead_letter=True), prefetch=10)
    late_dl = await adapter.receiver(Endpoint("topic", "events", "late", dead_letter=True), prefetch=10)
    assert await audit_dl.receive(10, 0.05) == []
    (dead,) = await late_dl.receive(10, 1.0)
    assert dead.record.headers[HEADER_DEAD_LETTER_SOURCE] == "topic:events/late"


async def test_per_key_order_holds_across_nacks_and_expiry(adapter: Adapter) -> None:
    await adapter.declare(Q)
    await adapter.send(Q, [rec(1, "a"), rec(2, "a"), rec(3, "b"), rec(4), rec(5, "a"), rec(6, "b")])
    r = await adapter.receiver(Q, prefetch=100)
    first = await r.receive(100, 1.0)
    assert bodies(first) == [1, 3, 4]  # one message per key at a time, keyless ones freely
    a1, b3, n4 = first
    await a1.nack()
    await n4.ack()
    again = await r.receive(100, 1.0)
    assert [(int(d.record.body), d.attempt) for d in again] == [(1, 2)]  # a1 keeps its place before a2
    await again[0].ack()
    assert bodies(await r.receive(100, 1.0)) == [2]
    await b3.ack()
    (b6,) = await r.receive(100, 1.0)
    assert int(b6.record.body) == 6
    await b6.ack()
    # a2 is held and never settled: a5 waits until a2's lease expires and a2 comes back first.
    (a2,) = await r.receive(100, 5.0)
    assert (int(a2.record.body), a2.attempt) == (2, 2)
    await a2.ack()
    assert bodies(await r.receive(100, 1.0)) == [5]


async def test_competing_receivers_never_hold_one_key_at_once(adapter: Adapter) -> None:
    await adapter.declare(Q)
    keys = ["k0", "k1", "k2"]
    await adapter.send(Q, [rec(i, keys[i % 3]) for i in range(90)])
    order: dict[str, list[int]] = {k: [] for k in keys}
    holding: set[str] = set()

    async def worker() -> None:
        r = await adapter.receiver(Q, prefetch=5)
        while True:
            batch = await r.receive(5, 0.3)
            if not batch:
                return
            for d in batch:
                key = d.record.key
                assert key is not None and key not in holding
                holding.add(key)
                order[key].append(int(d.record.body))
            await asyncio.sleep(0)
            for d in batch:
                holding.discard(d.record.key or "")
                await d.ack()

    await asyncio.gather(*(worker() for _ in range(3)))
    for i, k in enumerate(keys):
        assert order[k] == list(range(i, 90, 3))


async def test_verify_mode_only_checks(adapter: Adapter) -> None:
    sub = Endpoint("topic", "events", subscription="s")
    for endpoint in (Q, TOPIC, sub, DLQ):
        with pytest.raises(TopologyError):
            await adapter.declare(endpoint, create=False)
    await adapter.declare(Q)
    await adapter.declare(Q)  # idempotent
    await adapter.declare(sub)
    for endpoint in (Q, DLQ, TOPIC, sub, Endpoint("topic", "events", subscription="s", dead_letter=True)):
        await adapter.declare(endpoint, create=False)


async def test_bad_endpoints_and_oversized_messages_raise_typed_errors(db_url: str) -> None:
    a = make(db_url, max_message_size=100)
    await a.open()
    await a.declare(Q)
    with pytest.raises(MessageTooLarge):
        await a.send(Q, [rec(1), Record(b"x" * 200, "big")])
    with pytest.raises(ConfigError):
        await a.receiver(TOPIC, prefetch=1)
    with pytest.raises(ConfigError):
        await a.declare(Endpoint("queue", "q", subscription="s"))
    r = await a.receiver(Q, prefetch=10)
    assert await r.receive(10, 0.05) == []  # nothing of the refused batch was stored
    await r.close()
    with pytest.raises(ClosedError):
        await r.receive(1, 0)
    await a.close()


async def test_two_adapters_on_one_file_share_queues_exactly(db_url: str) -> None:
    one = make(db_url, poll_interval=0.01)
    two = make(db_url, poll_interval=0.01)
    await asyncio.gather(one.open(), two.open())
    await asyncio.gather(one.declare(Q), two.declare(Q))
    total = 3000
    sends = [one.send(Q, [rec(i) for i in range(j, j + 50)]) for j in range(0, total, 100)]
    sends += [two.send(Q, [rec(i) for i in range(j, j + 50)]) for j in range(50, total, 100)]
    await asyncio.gather(*sends)

    seen: Counter[str] = Counter()

    async def consume(which: int, a: Adapter) -> None:
        r = await a.receiver(Q, prefetch=64)
        while len(seen) < total:  # a total deadline below, not an idle timeout: slow machines stay green
            batch = await r.receive(32, 0.2)
            seen.update(d.record.id for d in batch)
            if which % 2:
                await r.ack_many(batch)
            else:
                await asyncio.gather(*(d.ack() for d in batch))

    async with asyncio.timeout(60):
        await asyncio.gather(*(consume(i, a) for i, a in enumerate((one, two, one, two))))
    assert await (await one.receiver(Q, 10)).receive(10, 0.3) == []  # nothing left over
    assert len(seen) == total  # 0 lost
    assert sum(seen.values()) == total  # 0 duplicates
    # Which adapter wins each batch is a race; that each sees what the other stored is not:
    await one.send(Q, [rec(i) for i in range(total, total + 10)])
    crossed = await (await two.receiver(Q, 64)).receive(64, 5.0)
    assert sorted(d.record.id for d in crossed) == sorted(rec(i).id for i in range(total, total + 10))
    await asyncio.gather(one.close(), two.close())


async def test_messages_survive_closing_and_reopening(db_url: str) -> None:
    a = make(db_url, visibility_timeout=0.3)
    await a.open()
    await a.declare(Q)
    await a.send(Q, [rec(i) for i in range(1000)])
    r = await a.receiver(Q, prefetch=10)
    held = await r.receive(10, 1.0)
    await r.close()
    await a.close()  # held leases are not released; they expire

    b = make(db_url, visibility_timeout=0.2)
    await b.open()
    got = await drain(await b.receiver(Q, prefetch=500), 1000)
    await b.close()
    assert sorted(int(d.record.body) for d in got) == list(range(1000))
    assert {d.record.id: d.attempt for d in got if d.attempt > 1} == {d.record.id: 2 for d in held}


async def test_a_waiting_receive_wakes_on_a_send_from_the_same_adapter(db_url: str) -> None:
    a = make(db_url, poll_interval=60)  # polling alone would not find it in time
    await a.open()
    await a.declare(Q)
    r = await a.receiver(Q, prefetch=10)
    waiting = asyncio.ensure_future(r.receive(10, 30.0))
    await asyncio.sleep(0.05)
    await a.send(Q, [rec(7)])
    got = await asyncio.wait_for(waiting, 10)
    assert bodies(got) == [7]
    await a.close()


async def test_cancelled_receive_gives_its_messages_back(adapter: Adapter) -> None:
    await adapter.declare(Q)
    await adapter.send(Q, [rec(i) for i in range(20)])
    r = await adapter.receiver(Q, prefetch=100)
    for _ in range(20):
        task = asyncio.ensure_future(r.receive(100, 1.0))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    got = await drain(r, 20, timeout=1.0)
    assert sorted(bodies(got)) == list(range(20))
    assert all(d.attempt == 1 for d in got)  # released leases do not count as deliveries
