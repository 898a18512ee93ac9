"""Checks for promises 1-3: durable send, at-least-once, ack / nack / reject / retries -> dead letters."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from typing import Any

import msgbus
from msgbus import HEADER_ATTEMPTS, HEADER_DEAD_LETTER_REASON, HEADER_DEAD_LETTER_SOURCE, Message, Outgoing
from msgbus.errors import ClosedError, MessageTooLarge

from ._context import ContractContext, Tally, ensure, examples, fail
from ._crash import crash_consumer, crash_sender
from ._flow import (
    chunked,
    drain,
    expect_only_sentinel,
    expect_raises,
    is_sentinel,
    nothing_comes_back,
    quiet_then_sentinel,
    reached,
    sentinel_sender,
    stop_run,
)

__all__ = [
    "check_ack_removes",
    "check_at_least_once_after_crash",
    "check_durable_send",
    "check_nack_redelivers",
    "check_reject_dead_letters",
    "check_retries_then_dead_letter",
    "check_send_survives_sender_crash",
]


def mixed_body(i: int) -> object:
    """Bytes, text and JSON bodies in turn, so every codec path is exercised."""
    return (f"bytes-{i}".encode(), f"text-{i} ✓", {"i": i, "kind": "json", "list": [i, None, True]})[i % 3]


async def check_durable_send(ctx: ContractContext) -> None:
    """send/send_many (one at a time, concurrent, batched) return only once the message is stored: a new bus
    receives exactly what was sent."""
    n = ctx.scale(2000, 200)
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    expected: dict[str, tuple[object, dict[str, str]]] = {}
    singles = n // 4
    ctx.waiting = "sending"
    for i in range(singles):
        headers = {"seq": str(i)}
        msg_id = await producer.send(mixed_body(i), headers=headers)
        expected[msg_id] = (mixed_body(i), headers)
    for chunk in chunked(range(singles, 2 * singles), 100):  # concurrent single sends (coalesced by the core)
        sends = [producer.send(mixed_body(i), headers={"seq": str(i)}) for i in chunk]
        for msg_id, i in zip(await asyncio.gather(*sends), chunk, strict=True):
            expected[msg_id] = (mixed_body(i), {"seq": str(i)})
    for chunk in chunked(range(2 * singles, n), 250):
        items: list[object] = []
        for i in chunk:
            items.append(Outgoing(mixed_body(i), headers={"seq": str(i)}) if i % 2 else mixed_body(i))
        ids = await producer.send_many(items)
        ensure(len(ids) == len(items), f"send_many of {len(items)} returned {len(ids)} ids")
        for msg_id, i in zip(ids, chunk, strict=True):
            expected[msg_id] = (mixed_body(i), {"seq": str(i)} if i % 2 else {})
    ensure(len(expected) == n, f"{n} sends returned only {len(expected)} distinct ids")
    await ctx.bus.close()
    closed_note = await expect_raises(producer.send(b"late"), ClosedError, "send on a closed bus")

    fresh = await ctx.open_bus()
    notes = [closed_note]
    limit = fresh.capabilities.max_message_size
    if limit is not None and limit <= 256 * 1024 * 1024:
        big = fresh.producer(queue).send(b"\0" * (limit + 1))
        notes.append(await expect_raises(big, MessageTooLarge, f"send of {limit + 1} bytes"))
    consumer = fresh.consumer(queue, prefetch=200)
    tally = Tally()
    wrong: list[str] = []

    def compare(msg: Message[Any]) -> None:
        want = expected.get(msg.id)
        if want is not None and (msg.body != want[0] or dict(msg.headers) != want[1]):
            wrong.append(f"{msg.id}: got {msg.body!r} {dict(msg.headers)}, sent {want[0]!r} {want[1]}")

    await drain(ctx, consumer, tally, lambda: tally.distinct >= n, on_message=compare, what="on a new bus")
    drained = time.monotonic()
    await consumer.close()
    quiet = await nothing_comes_back(
        ctx, lambda bus: bus.consumer(queue), sentinel_sender(fresh.producer(queue)), ctx.lock_window_after(drained)
    )
    line = tally.ensure_exact(
        set(expected), f"{singles} by send + {singles} by concurrent send + {n - 2 * singles} by send_many, new bus"
    )
    ensure(not wrong, f"{len(wrong)} bodies/headers changed, e.g. {wrong[0] if wrong else ''}")
    ctx.note(line)
    ctx.note("; ".join(notes))
    ctx.note(quiet)


# Seconds for messages whose sends returned to reach a fresh consumer: they are stored, so only a busy backend
# (24 checks at once on moto) makes them late, by seconds; a send that did not wait for them loses them.
SENT_BOUND = 30.0


async def check_send_survives_sender_crash(ctx: ContractContext) -> None:
    """A sender that dies the moment its sends returned (no close, no flush) loses none of them: send, concurrent
    sends and send_many return only once the backend has the messages, not once a client library buffered them."""
    n = ctx.scale(600, 90)  # a third each way
    queue = ctx.name()
    ids, how = await crash_sender(ctx, queue, n)
    ensure(len(set(ids)) == n, f"the sender reported {len(set(ids))} distinct ids for {n} sends")
    consumer = (await ctx.open_bus()).consumer(queue, prefetch=100)
    tally = Tally()
    try:
        async with asyncio.timeout(SENT_BOUND):
            await drain(ctx, consumer, tally, lambda: set(tally.counts) >= set(ids), what="what the sender sent")
    except TimeoutError:
        lost = set(ids) - set(tally.counts)
        fail(f"{tally.summary(ids)}: {len(lost)} whose sends had returned never arrived, e.g. {examples(lost)}")
    line = tally.ensure_exact(set(ids), f"{how} right after {n} sends returned")
    quiet = await expect_only_sentinel(ctx, consumer, sentinel_sender(ctx.bus.producer(queue)), ctx.quiet, "after")
    ctx.note(f"{line}; {quiet}")


async def check_at_least_once_after_crash(ctx: ContractContext) -> None:
    """A consumer that dies holding unacked messages loses nothing: they come back (attempt >= 2, same ids)."""
    n = ctx.scale(1000, 100)
    held_n = ctx.scale(20, 5)
    queue = ctx.name()
    sent: list[str] = []
    for chunk in chunked(range(n), 250):
        sent += await ctx.bus.producer(queue).send_many([{"i": i} for i in chunk])
    held, how = await crash_consumer(ctx, queue, held_n)
    never_sent = set(held) - set(sent)
    ensure(not never_sent, f"the crashed consumer held ids that were never sent: {examples(never_sent)}")
    survivor = (await ctx.open_bus()).consumer(queue)
    tally = Tally()
    attempts: dict[str, int] = {}

    async def handle(msg: Message[Any]) -> None:
        attempts[msg.id] = max(attempts.get(msg.id, 0), msg.attempt)
        tally.add(msg.id)

    task = ctx.background(survivor.run(handle, concurrency=4))
    ctx.waiting = f"the survivor to receive all {n} messages"
    await tally.wait_distinct(n)
    handled = time.monotonic()
    await stop_run(survivor, task)
    await survivor.close()
    line = tally.ensure_exact(set(sent), f"{how} held {held_n}", allow_dups=True)
    first_try = [i for i in held if attempts.get(i, 0) < 2]
    ensure(not first_try, f"{line}; {len(first_try)} held messages came back with attempt < 2, e.g. {first_try[:3]}")
    sentinel = sentinel_sender(ctx.bus.producer(queue))
    quiet = await nothing_comes_back(ctx, lambda bus: bus.consumer(queue), sentinel, ctx.lock_window_after(handled))
    ctx.note(f"{line} (dups allowed after a crash); all {held_n} held came back with attempt >= 2; {quiet}")


async def check_ack_removes(ctx: ContractContext) -> None:
    """Acked messages never come back, not even after the lock they were received under would have expired."""
    n = ctx.scale(1000, 100)
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    sent: list[str] = []
    for chunk in chunked(range(n), 250):
        sent += await producer.send_many([{"i": i} for i in chunk])
    consumer = ctx.bus.consumer(queue, prefetch=100)
    tally = Tally()
    await drain(ctx, consumer, tally, lambda: tally.distinct >= n)
    await consumer.close()
    ctx.note(tally.ensure_exact(set(sent), "acked"))
    again = (await ctx.open_bus()).consumer(queue)
    ctx.note(await expect_only_sentinel(ctx, again, sentinel_sender(producer), ctx.lock_window, "new consumer"))


async def check_nack_redelivers(ctx: ContractContext) -> None:
    """nack() redelivers with attempt + 1 and the same id, body, headers and key; nack(delay) waits."""
    m = ctx.scale(200, 20)
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    items = [Outgoing({"i": i}, key=f"k{i}", headers={"seq": str(i), "note": "nack ✓"}) for i in range(m)]
    sent = dict(zip(await producer.send_many(items), items, strict=True))
    consumer = ctx.bus.consumer(queue, prefetch=m)
    problems: list[str] = []
    for attempt in (1, 2, 3):
        tally = Tally()
        got = await drain(ctx, consumer, tally, reached(tally, m), settle=False, what=f"attempt {attempt}")
        tally.ensure_exact(set(sent), f"round {attempt}")
        for msg in got:
            want = sent[msg.id]
            if msg.attempt != attempt:
                problems.append(f"{msg.id} attempt {msg.attempt}, expected {attempt}")
            if msg.body != want.body or dict(msg.headers) != want.headers or msg.key != want.key:
                problems.append(f"{msg.id} changed on redelivery: {msg.body!r} {dict(msg.headers)} key={msg.key!r}")
            await (msg.nack() if attempt < 3 else msg.ack())
    acked = time.monotonic()
    ensure(not problems, f"{len(problems)} problems, e.g. {'; '.join(problems[:3])}")
    ctx.note(f"{m} sent, nacked twice, redelivered as attempt 2 and 3 with same id/body/headers/key, 0 lost, 0 dup")
    ctx.note(await expect_only_sentinel(ctx, consumer, sentinel_sender(producer), ctx.quiet, "after ack"))
    if ctx.caps.delayed_nack:
        await _check_delayed_nack(ctx, producer, consumer)
    else:
        ctx.note("nack(delay) not checked: delayed_nack not declared")
    await consumer.close()
    send = sentinel_sender(producer)
    ctx.note(await nothing_comes_back(ctx, lambda bus: bus.consumer(queue), send, ctx.lock_window_after(acked)))


async def _check_delayed_nack(ctx: ContractContext, producer: msgbus.Producer, consumer: msgbus.Consumer[Any]) -> None:
    delay, k = 1.0, 5
    ids = set(await producer.send_many([{"delayed": i} for i in range(k)]))
    tally = Tally()
    got = await drain(ctx, consumer, tally, lambda: tally.distinct >= k, settle=False, what="to nack with delay")
    nacked_at: dict[str, float] = {}
    for msg in got:
        nacked_at[msg.id] = time.monotonic()
        await msg.nack(delay=delay)
    back = Tally()
    early: list[str] = []

    def when(msg: Message[Any]) -> None:
        waited = time.monotonic() - nacked_at[msg.id]
        if waited < delay - 0.05:  # 50 ms for clock granularity between the broker and us
            early.append(f"{msg.id} after {waited:.2f}s")

    await drain(ctx, consumer, back, lambda: back.distinct >= k, on_message=when, what="delayed redeliveries")
    back.ensure_exact(ids, "nack(delay)")
    ensure(not early, f"nack(delay={delay}) redelivered early: {', '.join(early[:3])}")
    ctx.note(f"nack(delay={delay}s): {k} redelivered, none early")


async def check_reject_dead_letters(ctx: ContractContext) -> None:
    """reject(reason) moves a message to dead_letters(queue) with reason, attempts, original body and headers."""
    m = ctx.scale(200, 20)
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    items = [Outgoing({"i": i}, headers={"seq": str(i), "ünï": "çødé", "empty": ""}) for i in range(m)]
    sent = dict(zip(await producer.send_many(items), items, strict=True))
    consumer = ctx.bus.consumer(queue, prefetch=m)  # all held at once: rejected only after every one arrived
    tally = Tally()
    for msg in await drain(ctx, consumer, tally, reached(tally, m), settle=False):
        await msg.reject(f"contract reject {msg.headers.get('seq')}")
    dead = Tally()
    problems: list[str] = []

    def inspect(msg: Message[Any]) -> None:
        want = sent.get(msg.id)
        if want is None:
            return
        assert want.headers is not None
        headers = dict(msg.headers)
        reason = headers.get(HEADER_DEAD_LETTER_REASON)
        if reason != f"contract reject {want.headers['seq']}":
            problems.append(f"{msg.id}: reason {reason!r}")
        if headers.get(HEADER_ATTEMPTS) != "1":
            problems.append(f"{msg.id}: {HEADER_ATTEMPTS}={headers.get(HEADER_ATTEMPTS)!r}, expected '1'")
        if queue not in headers.get(HEADER_DEAD_LETTER_SOURCE, ""):
            problems.append(f"{msg.id}: {HEADER_DEAD_LETTER_SOURCE}={headers.get(HEADER_DEAD_LETTER_SOURCE)!r}")
        if any(headers.get(k) != v for k, v in want.headers.items()) or msg.body != want.body:
            problems.append(f"{msg.id}: body/headers changed: {msg.body!r} {headers}")

    dlq = ctx.bus.dead_letters(queue)
    await drain(ctx, dlq, dead, lambda: dead.distinct >= m, on_message=inspect, what="dead letters")
    line = dead.ensure_exact(set(sent), "rejected, read back from dead_letters")
    ensure(not problems, f"{line}; {len(problems)} dead letters wrong, e.g. {'; '.join(problems[:3])}")
    ctx.note(line + "; reason, attempts=1, source, body and headers intact")
    fresh = (await ctx.open_bus()).consumer(queue)
    ctx.note(await expect_only_sentinel(ctx, fresh, sentinel_sender(producer), ctx.lock_window, "main queue"))


async def check_retries_then_dead_letter(ctx: ContractContext) -> None:
    """A handler that always raises is retried to max_attempts, then dead-lettered; one that recovers is not."""
    m = ctx.scale(100, 10)
    policy = msgbus.RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
    queue = ctx.name("always")
    producer = ctx.bus.producer(queue)
    sent = set(await producer.send_many([{"i": i} for i in range(m)]))
    seen: dict[str, list[int]] = defaultdict(list)
    sentinels = Tally()

    async def always_fails(msg: Message[Any]) -> None:
        if is_sentinel(msg):
            sentinels.add(msg.id)
            return
        seen[msg.id].append(msg.attempt)
        raise RuntimeError(f"contract boom {msg.id}")

    consumer = ctx.bus.consumer(queue)
    task = ctx.background(consumer.run(always_fails, concurrency=8, retry=policy))
    dead = Tally()
    problems: list[str] = []

    def inspect(msg: Message[Any]) -> None:
        reason = msg.headers.get(HEADER_DEAD_LETTER_REASON, "")
        if f"contract boom {msg.id}" not in reason:
            problems.append(f"{msg.id}: reason {reason!r} lacks the exception text")
        if msg.headers.get(HEADER_ATTEMPTS) != "3":
            problems.append(f"{msg.id}: {HEADER_ATTEMPTS}={msg.headers.get(HEADER_ATTEMPTS)!r}, expected '3'")

    await drain(ctx, ctx.bus.dead_letters(queue), dead, lambda: dead.distinct >= m, on_message=inspect)
    line = dead.ensure_exact(sent, "always failing, dead-lettered")
    handled_before = sum(len(v) for v in seen.values())
    # Past the lock: a message whose dead-lettering did not settle it would be handled a fourth time.
    quiet = await quiet_then_sentinel(ctx, sentinels, sentinel_sender(producer), ctx.lock_window, "main queue")
    await stop_run(consumer, task)
    wrong = {i: a for i, a in seen.items() if a != [1, 2, 3]}
    ensure(not problems, f"{line}; {'; '.join(problems[:3])}")
    ensure(
        not wrong and sum(len(v) for v in seen.values()) == handled_before == 3 * m,
        f"each message must be handled exactly 3 times (attempts 1, 2, 3); {len(wrong)} were not, e.g. "
        f"{list(wrong.items())[:3]}",
    )
    ctx.note(f"{line}; each handled exactly 3 times, reason has the exception text, attempts=3; {quiet}")
    await _check_recovery(ctx, m, policy)


async def _check_recovery(ctx: ContractContext, m: int, policy: msgbus.RetryPolicy) -> None:
    queue = ctx.name("recovers")
    producer = ctx.bus.producer(queue)
    sent = set(await producer.send_many([{"i": i} for i in range(m)]))
    calls: Counter[str] = Counter()
    done = Tally()

    async def fails_once(msg: Message[Any]) -> None:
        if is_sentinel(msg):
            await msg.reject("contract sentinel")
            return
        calls[msg.id] += 1
        if msg.attempt == 1:
            raise ValueError("first try fails")
        done.add(msg.id)

    consumer = ctx.bus.consumer(queue)
    task = ctx.background(consumer.run(fails_once, concurrency=8, retry=policy))
    ctx.waiting = "messages that fail once to succeed"
    await done.wait_distinct(m)
    handled = time.monotonic()
    line = done.ensure_exact(sent, "failing once then succeeding")
    # The dead-letter destination must hold nothing but a sentinel the handler rejects on purpose.
    dlq = ctx.bus.dead_letters(queue)
    ctx.note(line + "; " + await expect_only_sentinel(ctx, dlq, sentinel_sender(producer), ctx.quiet, "its DLQ"))
    await stop_run(consumer, task)
    await consumer.close()
    wrong = {i: c for i, c in calls.items() if c != 2}
    ensure(not wrong, f"each must be handled exactly twice (fail, succeed); e.g. {list(wrong.items())[:3]}")
    send = sentinel_sender(producer)
    ctx.note(await nothing_comes_back(ctx, lambda bus: bus.consumer(queue), send, ctx.lock_window_after(handled)))
