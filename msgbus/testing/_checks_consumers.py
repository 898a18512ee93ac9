"""Checks for promises 4-6 and 10: competing consumers, held messages, fan-out, ordering, shutdown."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from msgbus import Consumer, Message, Outgoing, RetryPolicy
from msgbus.errors import MsgbusError

from ._context import ContractContext, Tally, ensure, examples
from ._flow import (
    DeadLetterWatch,
    chunked,
    drain,
    expect_only_sentinels,
    is_sentinel,
    nothing_comes_back,
    quiet_then_sentinel,
    sentinel_sender,
    stop_run,
)

__all__ = [
    "check_cancelled_subscription",
    "check_competing_consumers",
    "check_fan_out",
    "check_graceful_shutdown",
    "check_held_message_invisible",
    "check_lock_extension",
    "check_per_key_ordering",
]

Handler = Callable[[Message[Any]], Awaitable[None]]
ROUNDS = 3  # of the competing-consumers check, until more than one consumer got work


def counting(tally: Tally) -> Handler:
    async def handle(msg: Message[Any]) -> None:
        tally.add(msg.id)

    return handle


async def check_competing_consumers(ctx: ContractContext) -> None:
    """Dozens of consumers on one queue split it: together exactly N, none twice, none by two at once."""
    n, k = ctx.scale(3000, 300), ctx.scale(20, 4)
    queue = ctx.name()
    buses = [ctx.bus] + [await ctx.open_bus() for _ in range(min(k, 4) - 1)]
    consumers = [buses[i % len(buses)].consumer(queue) for i in range(k)]
    for c in consumers:
        await c.open()
    tally, per = Tally(), Counter[int]()
    in_flight: set[str] = set()
    overlaps: list[str] = []

    def handler(idx: int) -> Handler:
        async def handle(msg: Message[Any]) -> None:
            if msg.id in in_flight:
                overlaps.append(msg.id)
            in_flight.add(msg.id)
            try:
                await asyncio.sleep(0.002)  # long enough for handlers to overlap, so a double delivery shows
            finally:
                in_flight.discard(msg.id)
            per[idx] += 1
            tally.add(msg.id)

        return handle

    tasks = [ctx.background(c.run(handler(i))) for i, c in enumerate(consumers)]
    producer = ctx.bus.producer(queue)
    sent: list[str] = []
    # Consumers may take a while to take part (a Kafka group rebalances at each join, a heartbeat apart): one
    # that is quick enough can handle a whole round alone. Then send another round, up to ROUNDS in all.
    ctx.waiting = lambda: (
        f"{k} consumers to process {len(sent)} messages ({tally.distinct} processed, {tally.dups} dup; "
        f"per consumer: {[per[i] for i in range(k)]})"
    )
    for _ in range(ROUNDS):
        for chunk in chunked(range(n), 500):
            sent.extend(await producer.send_many([{"i": i} for i in chunk]))
        await tally.wait_distinct(len(sent))
        if sum(1 for c in per.values() if c) > 1:
            break
    handled = time.monotonic()
    line = tally.ensure_exact(set(sent), f"{k} consumers on {len(buses)} buses")
    quiet = await quiet_then_sentinel(ctx, tally, sentinel_sender(producer), ctx.quiet, "all consumers")
    for c in consumers:
        c.stop()
    await asyncio.gather(*tasks)
    for c in consumers:
        await c.close()
    send = sentinel_sender(producer)
    again = await nothing_comes_back(ctx, lambda bus: bus.consumer(queue), send, ctx.lock_window_after(handled))
    ensure(not overlaps, f"{line}; {len(overlaps)} messages were in two handlers at once: {examples(overlaps)}")
    busy = [c for c in per.values() if c]
    ensure(len(busy) > 1, f"{line}; only one of {k} consumers got any work in {ROUNDS} rounds")
    ctx.note(f"{line}, 0 in two handlers at once; {len(busy)}/{k} consumers got work ({min(busy)}-{max(busy)} each)")
    ctx.note(f"{quiet}; {again}")


async def check_held_message_invisible(ctx: ContractContext) -> None:
    """A received, unsettled message is invisible to other consumers (until its lock, if any, expires)."""
    h = ctx.scale(10, 3)
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    sent = set(await producer.send_many([{"held": i} for i in range(h)]))
    holder = ctx.bus.consumer(queue, prefetch=h)
    lock = ctx.lock_duration
    taken_at = time.monotonic()
    held: list[Message[Any]] = []
    ctx.waiting = f"the holder to take {h} messages"
    while len(held) < h:
        held += await holder.receive(max_messages=h - len(held), timeout=1.0)
    expiry = taken_at + lock if lock else float("inf")  # no lock may expire before this
    other = (await ctx.open_bus()).consumer(queue)
    window = 0.5 * lock if lock else 2 * ctx.quiet
    ctx.waiting = f"a {window:.1f}s window in which the held messages must stay invisible"
    seen: list[tuple[str, float]] = []
    end = time.monotonic() + window
    while (left := end - time.monotonic()) > 0:
        seen += [(m.id, time.monotonic()) for m in await other.receive(max_messages=100, timeout=left)]
    sentinel = await sentinel_sender(producer)()
    while not any(i == sentinel for i, _ in seen):
        seen += [(m.id, time.monotonic()) for m in await other.receive(max_messages=100, timeout=1.0)]
    early = [i for i, at in seen if i in sent and at < expiry]
    stray = [i for i, _ in seen if i not in sent and i != sentinel]
    for msg in held:
        try:
            await msg.ack()
        except MsgbusError:
            if time.monotonic() < expiry:
                raise  # settling within the lock must work; after it, a backend may report the lock lost
    ensure(not early, f"{len(early)} of {h} held messages reached a second consumer while held: {examples(early)}")
    ensure(not stray, f"the second consumer got {len(stray)} unexpected messages: {examples(stray)}")
    late = len([i for i, _ in seen if i in sent])
    ctx.note(
        f"{h} held unacked; a second consumer got 0 of them in {window:.1f}s"
        + (f" ({late} after the {lock}s lock expired)" if late else "")
        + ", then the sentinel alone"
    )


async def check_lock_extension(ctx: ContractContext) -> None:
    """While a handler runs longer than 2x the lock duration, run() extends the lock: no one else gets it."""
    lock = ctx.lock_duration or 1.0
    hold, h = 2.5 * lock, ctx.scale(4, 2)
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    started, finished = Tally(), Tally()

    async def slow(msg: Message[Any]) -> None:
        started.add(msg.id)
        await asyncio.sleep(hold)
        finished.add(msg.id)

    holder = ctx.bus.consumer(queue)
    task_a = ctx.background(holder.run(slow, concurrency=h))
    # Sent over one extension period (run() extends every third of the lock): an extension made late leaves a
    # message to others from its expiry until the next extension, a gap set by when it arrived; one gets a long one.
    sent = set()
    for i in range(h):
        sent.add(await producer.send({"long": i}))
        await asyncio.sleep(lock / 3 / h)
    ctx.waiting = "the long handlers to start"
    await started.wait_distinct(h)
    others = Tally()
    other = (await ctx.open_bus()).consumer(queue)
    task_b = ctx.background(other.run(counting(others), concurrency=2))
    ctx.waiting = f"{h} handlers sleeping {hold:.1f}s (lock {lock}s)"
    await finished.wait_distinct(h)
    await stop_run(holder, task_a)
    stolen = [i for i in others.order if i in sent]
    ensure(not stolen, f"{len(stolen)} messages reached a second consumer while held by a handler: {examples(stolen)}")
    ensure(started.dups == 0, f"{started.dups} messages were redelivered to the holder while it handled them")
    quiet = await quiet_then_sentinel(ctx, others, sentinel_sender(producer), ctx.lock_window, "after the acks")
    await stop_run(other, task_b)
    ctx.note(f"{h} handlers ran {hold:.1f}s (> 2x lock {lock}s): 0 seen by a second consumer, each handled once")
    ctx.note(quiet)


async def check_fan_out(ctx: ContractContext) -> None:
    """Several topics at once, 3 subscriptions each: every subscription gets every message of its topic once."""
    t, m = ctx.scale(3, 2), ctx.scale(300, 40)
    topics = [ctx.name(f"t{j}") for j in range(t)]
    extra_bus = await ctx.open_bus()
    tallies: dict[tuple[int, int], Tally] = {}
    split: dict[int, Counter[int]] = {}
    foreign: list[str] = []
    runs: list[tuple[Consumer[Any], asyncio.Task[Any]]] = []
    subscribers: list[tuple[Consumer[Any], Handler]] = []
    names: dict[int, list[str]] = {}
    for j, topic in enumerate(topics):
        split[j] = Counter()
        for s in range(3):
            tally = tallies[(j, s)] = Tally()
            name = ctx.name(f"s{s}")
            names.setdefault(j, []).append(name)
            for c in range(2 if s == 0 else 1):
                bus = extra_bus if c else ctx.bus
                sub = bus.subscriber(topic, subscription=name)
                await sub.open()
                subscribers.append((sub, _fan_handler(tally, topic, foreign, split[j] if s == 0 else None, c)))
    for receiver, handler in subscribers:
        runs.append((receiver, ctx.background(receiver.run(handler, concurrency=2))))

    async def publish(topic: str) -> list[str]:
        publisher = ctx.bus.publisher(topic)
        ids = [await publisher.publish({"n": i}, headers={"contract-topic": topic}) for i in range(m // 4)]
        for chunk in chunked(range(m // 4, m), 100):
            ids += await publisher.publish_many([{"n": i} for i in chunk], headers={"contract-topic": topic})
        return ids

    sent = await asyncio.gather(*(publish(topic) for topic in topics))
    for (j, s), tally in tallies.items():
        ctx.waiting = lambda j=j, s=s: f"subscription s{s} of topic {j + 1}/{t} to get {m} ({_progress(tallies)})"
        await tally.wait_distinct(m)
    for j, topic in enumerate(topics):
        # A member that joins late (a Kafka group's rebalance takes seconds) may find the quick volume gone:
        # more of the same topic, counted like the rest, until the shared subscription's second consumer works.
        while len(split[j]) < 2:
            ctx.waiting = f"the second consumer of topic {j + 1}'s shared subscription to get work ({dict(split[j])})"
            more = [{"n": i} for i in range(len(sent[j]), len(sent[j]) + 10)]
            sent[j] += await ctx.bus.publisher(topic).publish_many(more, headers={"contract-topic": topic})
            for s in range(3):
                await tallies[(j, s)].wait_distinct(len(sent[j]))
    lines = [tally.ensure_exact(set(sent[j]), f"{topics[j][-10:]}/s{s}") for (j, s), tally in tallies.items()]
    ensure(not foreign, f"{len(foreign)} messages reached a subscription of another topic: {examples(foreign)}")
    for j, counts in split.items():
        ensure(len(counts) == 2, f"topic {j}: of two consumers on one subscription only one got work ({dict(counts)})")
    # Quiet window, then one sentinel per topic: each subscription must get exactly its topic's sentinel.
    ctx.waiting = "the quiet window"
    before = {key: tally.total for key, tally in tallies.items()}
    await asyncio.sleep(ctx.quiet)
    sentinels = [await sentinel_sender(ctx.bus.publisher(topic))() for topic in topics]
    for (j, _s), tally in tallies.items():
        await tally.wait_until(reached_id(tally, sentinels[j]))
    extra = {key: [i for i in tally.order[before[key] :] if i != sentinels[key[0]]] for key, tally in tallies.items()}
    late = {k: v for k, v in extra.items() if v}
    ensure(not late, f"deliveries after all had been received: {late}")
    handled = time.monotonic()
    for running, task in runs:
        await stop_run(running, task)
        await running.close()
    # Past the lock, fresh subscribers of every subscription: an ack the handlers' batches lost comes back here.
    fresh_bus = await ctx.open_bus()
    groups = [
        (sentinel_sender(ctx.bus.publisher(topic)), [fresh_bus.subscriber(topic, subscription=s) for s in names[j]])
        for j, topic in enumerate(topics)
    ]
    again = await expect_only_sentinels(ctx, groups, ctx.lock_window_after(handled), "fresh subscribers")
    ctx.note(f"{t} topics x 3 subscriptions, {m} messages per topic: every subscription exact, 0 dup, 0 foreign")
    ctx.note("shared subscriptions split: " + ", ".join(f"{dict(c)}" for c in split.values()))
    ctx.note(f"{lines[0]} (and {len(lines) - 1} more like it); quiet window + one sentinel per subscription")
    ctx.note(again)


def _progress(tallies: dict[tuple[int, int], Tally]) -> str:
    return "all: " + ", ".join(f"t{j + 1}/s{s}={tally.distinct}" for (j, s), tally in tallies.items())


def reached_total(tally: Tally, n: int) -> Callable[[], bool]:
    return lambda: tally.total >= n


def reached_id(tally: Tally, msg_id: str) -> Callable[[], bool]:
    return lambda: msg_id in tally


def _fan_handler(tally: Tally, topic: str, foreign: list[str], split: Counter[int] | None, idx: int) -> Handler:
    async def handle(msg: Message[Any]) -> None:
        if not is_sentinel(msg) and msg.headers.get("contract-topic") != topic:
            foreign.append(msg.id)
        if split is not None and not is_sentinel(msg):
            split[idx] += 1
        await asyncio.sleep(0.001)
        tally.add(msg.id)

    return handle


async def check_cancelled_subscription(ctx: ContractContext) -> None:
    """After run() is cancelled (or stopped and closed) no handler runs; the messages wait for the next one."""
    m = ctx.scale(300, 30)
    topic, subscription = ctx.name("t"), ctx.name("s")
    publisher = ctx.bus.publisher(topic)

    async def batch(tag: str) -> set[str]:
        ids: list[str] = []
        for chunk in chunked(range(m), 100):
            ids += await publisher.publish_many([{"batch": tag, "i": i} for i in chunk])
        return set(ids)

    first: Consumer[Any] = ctx.bus.subscriber(topic, subscription=subscription)
    t1 = Tally()
    await first.open()
    task1 = ctx.background(first.run(counting(t1), concurrency=4))
    ids1 = await batch("1")
    await t1.wait_distinct(m)
    task1.cancel()
    try:
        await task1
    except asyncio.CancelledError:
        pass
    ids2, handled = await batch("2"), t1.total
    ctx.waiting = "the quiet window after cancelling run()"
    await asyncio.sleep(ctx.lock_window)
    ensure(t1.total == handled, f"the cancelled run() handled {t1.total - handled} more messages")
    await first.close()
    second: Consumer[Any] = (await ctx.open_bus()).subscriber(topic, subscription=subscription)
    t2 = Tally()
    task2 = ctx.background(second.run(counting(t2), concurrency=4))
    await t2.wait_distinct(m)
    line2 = t2.ensure_exact(ids2, "published while cancelled, then received by a fresh subscriber")
    await stop_run(second, task2)
    await second.close()
    ids3, handled = await batch("3"), t2.total
    await asyncio.sleep(ctx.quiet)
    ensure(t2.total == handled, f"the stopped and closed subscriber handled {t2.total - handled} more messages")
    third: Consumer[Any] = (await ctx.open_bus()).subscriber(topic, subscription=subscription)
    t3 = Tally()
    task3 = ctx.background(third.run(counting(t3), concurrency=4))
    await t3.wait_distinct(m)
    handled_at = time.monotonic()
    line3 = t3.ensure_exact(ids3, "published after stop()+close(), then received by a fresh subscriber")
    quiet = await quiet_then_sentinel(ctx, t3, sentinel_sender(publisher), ctx.quiet, "fresh subscriber")
    await stop_run(third, task3)
    await third.close()
    quiet += "; " + await nothing_comes_back(
        ctx,
        lambda bus: bus.subscriber(topic, subscription=subscription),
        sentinel_sender(publisher),
        ctx.lock_window_after(handled_at),
    )
    ctx.note(f"{len(ids1)} handled before cancel; 0 handled after cancel or after stop()+close()")
    ctx.note(f"{line2}; {line3}; {quiet}")


async def check_per_key_ordering(ctx: ContractContext) -> None:
    """Same key -> send order, one at a time, across redeliveries: message i+1 never before i was acked."""
    keys, per_key = ctx.scale(20, 5), ctx.scale(50, 20)
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    items = [Outgoing({"k": f"key-{k}", "i": i}, key=f"key-{k}") for i in range(per_key) for k in range(keys)]
    sent: list[str] = []
    for chunk in chunked(items, 200):
        sent += await producer.send_many(chunk)
    next_i: dict[str, int] = {f"key-{k}": 0 for k in range(keys)}
    busy: set[str] = set()
    violations: list[str] = []
    done, injected = Tally(), Counter[str]()

    async def handle(msg: Message[Any]) -> None:
        if is_sentinel(msg):
            done.add(msg.id)
            return
        key, i = msg.body["k"], msg.body["i"]
        if key in busy:
            violations.append(f"{key}#{i} delivered while another {key} message was in a handler")
        if i != next_i[key]:
            state = "already acked" if i < next_i[key] else f"#{next_i[key]} not acked yet"
            violations.append(f"{key}#{i} (attempt {msg.attempt}) delivered while {state}")
        busy.add(key)
        try:
            await asyncio.sleep(0.001)
            if msg.attempt == 1 and zlib.crc32(f"{key}:{i}".encode()) % 10 == 0:
                injected[msg.id] += 1
                raise RuntimeError("injected failure")
            next_i[key] = max(next_i[key], i + 1)
            done.add(msg.id)
        finally:
            busy.discard(key)

    policy = RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.05)
    consumers = [ctx.bus.consumer(queue), (await ctx.open_bus()).consumer(queue)]
    tasks = [ctx.background(c.run(handle, concurrency=8, retry=policy)) for c in consumers]
    ctx.waiting = f"{keys * per_key} keyed messages"
    await done.wait_until(lambda: done.distinct >= len(sent) or len(violations) > 20)
    ensure(not violations, f"{len(violations)} ordering violations, e.g. {'; '.join(violations[:3])}")
    handled = time.monotonic()
    line = done.ensure_exact(set(sent), f"{keys} keys x {per_key}, 2 consumers x concurrency 8")
    quiet = await quiet_then_sentinel(ctx, done, sentinel_sender(producer), ctx.quiet, "after all acked")
    for c, task in zip(consumers, tasks, strict=True):
        await stop_run(c, task)
        await c.close()
    send = sentinel_sender(producer)
    quiet += "; " + await nothing_comes_back(ctx, lambda bus: bus.consumer(queue), send, ctx.lock_window_after(handled))
    ensure(not violations, f"{len(violations)} ordering violations, e.g. {'; '.join(violations[:3])}")
    ctx.note(f"{line}; {len(injected)} first attempts failed on purpose; 0 ordering violations; {quiet}")


async def check_graceful_shutdown(ctx: ContractContext) -> None:
    """stop() and cancellation let in-flight handlers finish (acked) and release the rest; nothing lost or doubled."""
    n, conc = ctx.scale(400, 80), 4
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    sent: set[str] = set()
    for chunk in chunked(range(n), 200):
        sent |= set(await producer.send_many([{"i": i} for i in chunk]))
    finished = Tally()
    phases: list[str] = []

    def handler(seconds: float, started: Tally, cancelled: Counter[str]) -> Handler:
        async def handle(msg: Message[Any]) -> None:
            started.add(msg.id)
            try:
                await asyncio.sleep(seconds)
            except asyncio.CancelledError:
                cancelled[msg.id] += 1
                raise
            finished.add(msg.id)

        return handle

    for how, target in (("stop()", n // 8), ("cancel", n // 4)):
        started, cancelled = Tally(), Counter[str]()
        before = finished.total
        consumer = (await ctx.open_bus()).consumer(queue)
        task = ctx.background(consumer.run(handler(0.05, started, cancelled), concurrency=conc, shutdown_timeout=10))
        ctx.waiting = f"{target} messages handled before {how}"
        await finished.wait_until(reached_total(finished, target))
        if how == "stop()":
            await stop_run(consumer, task)
        else:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        done_here = finished.total - before
        ensure(
            not cancelled and started.total == done_here,
            f"after {how}: {started.total} handlers started, {done_here} finished, {len(cancelled)} cancelled "
            f"(in-flight handlers must finish within shutdown_timeout)",
        )
        await consumer.close()
        phases.append(f"{how}: {done_here} handled, in-flight ones finished")
    started, cancelled = Tally(), Counter[str]()
    consumer = (await ctx.open_bus()).consumer(queue)
    task = ctx.background(consumer.run(handler(3600, started, cancelled), concurrency=conc, shutdown_timeout=0.3))
    ctx.waiting = "handlers that outlive shutdown_timeout to start"
    await started.wait_until(reached_total(started, conc))
    await stop_run(consumer, task)
    ensure(
        sum(cancelled.values()) == started.total == conc,
        f"handlers past shutdown_timeout: {started.total} started, {sum(cancelled.values())} cancelled",
    )
    await consumer.close()
    phases.append(f"stop() with shutdown_timeout=0.3: {conc} overrunning handlers cancelled and nacked")
    rest = Tally()
    fresh = (await ctx.open_bus()).consumer(queue, prefetch=100)
    dead = DeadLetterWatch(ctx, queue)  # none may be: each stop gave its messages back uncounted or counted once
    seen = (rest.counts, finished.counts, dead.tally.counts)
    await drain(ctx, fresh, rest, lambda: len(set[str]().union(*seen)) >= n, what="the rest")
    await dead.stop()
    dead.ensure_none("messages of the stopped consumers were")
    doubled = set(rest.counts) & set(finished.counts)
    ensure(finished.dups == 0 and not doubled, f"{len(doubled) + finished.dups} handled messages came back")
    ensure(
        set(rest.counts) | set(finished.counts) == sent and rest.dups == 0,
        f"processed {finished.distinct} + rest {rest.distinct} (dup {rest.dups}) != {n} sent",
    )
    drained = time.monotonic()
    await fresh.close()
    send = sentinel_sender(producer)
    quiet = await nothing_comes_back(ctx, lambda bus: bus.consumer(queue), send, ctx.lock_window_after(drained))
    ctx.note("; ".join(phases))
    ctx.note(f"{n} sent = {finished.distinct} processed + {rest.distinct} received afterwards, 0 lost, 0 dup; {quiet}")
