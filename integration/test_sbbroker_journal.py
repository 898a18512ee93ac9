"""The Service Bus test broker's journal: what it acknowledged survives a kill (no graceful save), as on Azure.

These drive ``integration.sbbroker.store.Store`` directly (no AMQP): a store that is dropped without ``save``
is a killed broker. The failure suite's restart scenario proves the same through the SDK (docs/reliability.md).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from integration.sbbroker.store import MAX_DELIVERY_COUNT, Store


def _killed_and_reopened(path: Path) -> Store:
    store = Store(lock_duration=30)
    store.open(path)
    return store


def _live(store: Store, path: str) -> dict[int, bytes]:
    return {seq: m.raw for seq, m in store.message_queue(path).messages.items()}


def test_every_acknowledged_change_survives_a_kill(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    store = _killed_and_reopened(state)
    queue = store.entity("orders", "queue")
    for i in range(10):
        store.enqueue(queue, f"m{i}".encode())
    topic = store.entity("events", "topic")
    subs = [store.message_queue(f"events/Subscriptions/{name}") for name in ("a", "b")]
    store.enqueue(topic, b"fan-out")
    mq = store.message_queue("orders")
    held = [store.lock(mq, mq.pop_ready(), None) for _ in range(4)]  # type: ignore[arg-type]
    store.complete(held[0])
    store.dead_letter(held[1], "bad", "refused")
    store.defer(held[2])
    store.release(held[3], count=True)  # a failed delivery: its count survives
    store.schedule(queue, b"later", due=4_000_000_000.0)
    second = store.schedule(queue, b"cancelled", due=4_000_000_000.0)
    store.cancel(queue, {second})
    held_sub = store.lock(subs[0], subs[0].pop_ready(), None)  # type: ignore[arg-type]
    store.complete(held_sub)
    seq_before = store.seq
    # No save(): the process is gone. Two kills in a row must replay the same way.
    for _ in range(2):
        store = _killed_and_reopened(state)
        live = _live(store, "orders")
        assert sorted(live.values()) == sorted(f"m{i}".encode() for i in range(1, 10) if i != 1)
        assert len(live) == 8
        assert [m.raw for m in store.message_queue("orders/$DeadLetterQueue").messages.values()] == [b"m1"]
        dead = next(iter(store.message_queue("orders/$DeadLetterQueue").messages.values()))
        assert dead.dead_letter == {"DeadLetterReason": "bad", "DeadLetterErrorDescription": "refused"}
        deferred = [m.raw for m in store.message_queue("orders").messages.values() if m.deferred]
        assert deferred == [b"m2"]
        counts = {m.raw: m.delivery_count for m in store.message_queue("orders").messages.values()}
        assert counts[b"m3"] == 1
        assert [raw for _, _, raw in store.entity("orders", None).scheduled] == [b"later"]
        assert _live(store, "events/Subscriptions/a") == {}
        assert list(_live(store, "events/Subscriptions/b").values()) == [b"fan-out"]
        assert store.seq == seq_before
        assert store.entity("events", None).kind == "topic"


def test_a_graceful_stop_compacts_and_a_stale_journal_is_not_replayed_twice(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    store = _killed_and_reopened(state)
    queue = store.entity("q", "queue")
    for _ in range(5):
        store.enqueue(queue, uuid.uuid4().bytes)
    store.save(state)  # a graceful stop: snapshot, then an empty journal of the new epoch
    assert state.with_suffix(".journal").read_text().count("\n") == 1
    store = _killed_and_reopened(state)
    assert len(_live(store, "q")) == 5
    assert store.replayed == 0
    # A stop killed between the snapshot and the journal's truncation: the old journal must not count twice.
    journal = state.with_suffix(".journal")
    stale = journal.read_text()
    store.enqueue(store.entity("q", None), b"one more")
    store.save(state)
    journal.write_text(stale + '{"op":"enq","paths":["q"],"seq":99,"raw":"eA==","at":0}\n')
    store = _killed_and_reopened(state)
    assert len(_live(store, "q")) == 6


def test_a_line_cut_short_by_a_kill_is_ignored(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    store = _killed_and_reopened(state)
    mq_entity = store.entity("q", "queue")
    store.enqueue(mq_entity, b"kept")
    with state.with_suffix(".journal").open("a") as f:
        f.write('{"op":"enq","paths":["q"],"se')  # the write a SIGKILL interrupted: never answered for
    store = _killed_and_reopened(state)
    assert list(_live(store, "q").values()) == [b"kept"]


def test_the_delivery_limit_survives_a_kill(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    store = _killed_and_reopened(state)
    store.enqueue(store.entity("q", "queue"), b"poison")
    for _ in range(MAX_DELIVERY_COUNT - 1):
        mq = store.message_queue("q")
        store.release(store.lock(mq, mq.pop_ready(), None), count=True)  # type: ignore[arg-type]
        store = _killed_and_reopened(state)
    mq = store.message_queue("q")
    store.release(store.lock(mq, mq.pop_ready(), None), count=True)  # type: ignore[arg-type]
    store = _killed_and_reopened(state)
    assert _live(store, "q") == {}
    dead = list(store.message_queue("q/$DeadLetterQueue").messages.values())
    assert [(m.raw, m.dead_letter["DeadLetterReason"]) for m in dead] == [(b"poison", "MaxDeliveryCountExceeded")]
