"""Checks for settling in part and in bulk: acks with gaps then close or crash, stop() handing messages back,
thousands of acks and immediate nacks under run()."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from typing import Any

from msgbus import Message, Outgoing, RetryPolicy

from ._context import ContractContext, Tally, ensure, examples, fail
from ._crash import crash_with_gaps
from ._flow import chunked, drain, expect_only_sentinel, nothing_comes_back, sentinel_sender, stop_run
from .worker import is_gap

__all__ = ["check_bulk_settling", "check_stop_releases", "check_unacked_come_back"]

RELEASE_BOUND = 1.0  # seconds after stop() within which a backend without locks must have handed messages back
STOP_SLACK = 3.0  # seconds past that bound before the check stops waiting and fails
CLOSE_SLACK = 10.0  # seconds beyond the lock window for a closed consumer's unacked messages to be back
LATE_RECEIVE = 0.5  # seconds of the closing consumer's last, empty receive, and of its wait before close()


async def check_unacked_come_back(ctx: ContractContext) -> None:
    """A consumer acks some of what it holds, leaving gaps, then closes or dies: exactly the unacked ones come
    back (with the messages it never took), and none of the acked ones, not even after their lock would expire."""
    for note in await asyncio.gather(_gaps_then(ctx, "close"), _gaps_then(ctx, "crash")):  # each waits out locks
        ctx.note(note)


async def _gaps_then(ctx: ContractContext, how: str) -> str:
    held_n, rest_n = ctx.scale(60, 15), ctx.scale(60, 15)
    queue = ctx.name(how)
    producer = ctx.bus.producer(queue)
    # One call: Kafka puts a call's unkeyed records on one partition, so the acks leave gaps in it.
    first = held_n if how == "close" else held_n + rest_n
    sent = set(await producer.send_many([{"i": i} for i in range(first)]))
    if how == "close":
        holder = (await ctx.open_bus()).consumer(queue, prefetch=held_n)
        tally = Tally()
        held = await drain(ctx, holder, tally, lambda: tally.distinct >= held_n, settle=False, what="to hold")
        acked = {m.id for i, m in enumerate(held) if not is_gap(i)}
        for msg in held:
            if msg.id in acked:
                await msg.ack()
        # The acks freed room: a receive that finds nothing may leave its request open (a NATS pull lingers on
        # the server), so the rest, sent now, reach the holder's read-ahead and never a caller: close() must
        # hand them back (a NATS +TERM instead of -NAK loses them).
        await holder.receive(max_messages=held_n, timeout=LATE_RECEIVE)  # finds nothing; unacked if it does
        sent |= set(await producer.send_many([{"i": i} for i in range(held_n, held_n + rest_n)]))
        await asyncio.sleep(LATE_RECEIVE)  # open a moment longer, as a service would: the sends reach it
        await holder.close()
        died = "closed"
    else:
        held_ids, acked_ids, died = await crash_with_gaps(ctx, queue, held_n)
        acked = set(acked_ids)
        ensure(set(held_ids) <= sent, f"the crashed consumer held ids never sent: {examples(set(held_ids) - sent)}")
    closed_at = time.monotonic()
    survivor = (await ctx.open_bus()).consumer(queue, prefetch=100)
    back = Tally()
    expected = sent - acked
    what = f"the unacked after the {how}"
    if how == "close":
        # A close hands back what it held at once, or its locks expire: either way they are back within a
        # lock window (and a fresh consumer's start). A crash may take the backend's own timeout to notice.
        bound = ctx.lock_window + CLOSE_SLACK
        try:
            async with asyncio.timeout(max(0.1, closed_at + bound - time.monotonic())):
                await drain(ctx, survivor, back, lambda: set(back.counts) >= expected, what=what)
        except TimeoutError:
            missing = expected - set(back.counts)
            fail(
                f"{len(missing)} of the {len(expected)} unacked or untaken messages were not back {bound:.1f}s "
                f"after close() (the lock window plus {CLOSE_SLACK:.0f}s), e.g. {examples(missing)}"
            )
    else:
        await drain(ctx, survivor, back, lambda: set(back.counts) >= expected, what=what)
    returned = acked & set(back.counts)
    label = f"{died} after acking {len(acked)} of {held_n} held, leaving gaps; the unacked and untaken"
    line = back.ensure_exact(expected, label, allow_dups=how == "crash")
    ensure(not returned, f"{line}; {len(returned)} acked messages came back: {examples(returned)}")
    quiet = await expect_only_sentinel(ctx, survivor, sentinel_sender(producer), ctx.lock_window, "then")
    return f"{line}, 0 acked came back; {quiet}"


async def check_stop_releases(ctx: ContractContext) -> None:
    """stop() of run() without close(): the messages it fetched but never started reach another consumer well
    within the lock duration (within a second where there are no locks)."""
    n, prefetch = ctx.scale(300, 60), ctx.scale(50, 20)
    lock = ctx.lock_duration
    bound = 0.5 * lock if lock else RELEASE_BOUND
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    holder_done, other_done = Tally(), Tally()

    async def slow(msg: Message[Any]) -> None:
        await asyncio.sleep(0.1)
        holder_done.add(msg.id)

    async def fast(msg: Message[Any]) -> None:
        other_done.add(msg.id)

    holder = (await ctx.open_bus()).consumer(queue, prefetch=prefetch)
    holder_task = ctx.background(holder.run(slow, concurrency=1))
    sent: set[str] = set()
    for chunk in chunked(range(n), 50):  # a key each: spread over every partition where there are several
        sent |= set(await producer.send_many([Outgoing({"i": i}, key=f"k{i}") for i in chunk]))
    ctx.waiting = "the slow holder to start (and fill its prefetch)"
    await holder_done.wait_distinct(1)
    # The other consumer takes part before the stop (on Kafka: a group member that got its share of the
    # partitions), so it is the holder's stop that must hand the rest over, not a newcomer's arrival.
    other = (await ctx.open_bus()).consumer(queue)
    other_task = ctx.background(other.run(fast, concurrency=4))
    ctx.waiting = "the other consumer to take part"
    while not other_done.distinct:  # on Kafka its partitions may hold nothing left: keep some coming its way
        sent.add(await producer.send({"extra": len(sent)}, key=f"x{len(sent)}"))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await other_done.wait_distinct(1)
    ctx.waiting = "the holder to handle 3 messages"
    await holder_done.wait_distinct(3)
    stopped = time.monotonic()
    await stop_run(holder, holder_task)  # no close(): the holder stays open, as a paused service would
    rest = sent - set(holder_done.counts)
    ctx.waiting = lambda: f"the other consumer to get the {len(rest)} the holder did not handle ({other_done.distinct})"
    try:
        async with asyncio.timeout(bound + STOP_SLACK):
            await other_done.wait_until(lambda: set(other_done.counts) >= rest)
    except TimeoutError:
        missing = rest - set(other_done.counts)
        fail(
            f"after stop() (without close()) {len(missing)} of the {len(rest)} messages the holder did not handle "
            f"were still not available {bound + STOP_SLACK:.1f}s later (bound {bound:.2f}s), e.g. {examples(missing)}"
        )
    took = time.monotonic() - stopped
    handled_twice = set(holder_done.counts) & set(other_done.counts)
    ensure(not handled_twice, f"{len(handled_twice)} handled by both consumers: {examples(handled_twice)}")
    ensure(
        took <= bound,
        f"after stop() (without close()) the other consumer got the last of the {len(rest)} unhandled messages "
        f"{took:.2f}s later; they must be available within {bound:.2f}s"
        + (f" (half the {lock}s lock)" if lock else ""),
    )
    line = other_done.ensure_exact(rest, f"{holder_done.distinct} handled by the holder, the rest by the other")
    await stop_run(other, other_task)
    await other.close()
    await holder.close()
    quiet = await nothing_comes_back(
        ctx, lambda bus: bus.consumer(queue), sentinel_sender(producer), ctx.lock_window_after(stopped + took)
    )
    ctx.note(f"{line}; all of them within {took:.2f}s of stop() (bound {bound:.2f}s), the holder still open; {quiet}")


async def check_bulk_settling(ctx: ContractContext) -> None:
    """Thousands of instant handlers at concurrency 64 (acks go out in large batches), with nack() without delay
    and failures retried without backoff: each handled exactly as often as it should be; nothing comes back."""
    n, conc = ctx.scale(3000, 600), 64
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    sent: list[str] = []
    for chunk in chunked(range(n), 500):
        sent += await producer.send_many([{"i": i} for i in chunk])
    attempts: dict[str, list[int]] = defaultdict(list)
    twice: set[str] = set()  # nacked or failed on their first attempt
    done = Tally()

    async def handle(msg: Message[Any]) -> None:
        i = msg.body["i"]
        attempts[msg.id].append(msg.attempt)
        if i % 10 == 3 and msg.attempt == 1:
            twice.add(msg.id)
            await asyncio.sleep(0.01)  # settled after later messages were acked: a batch ack must skip it
            await msg.nack()  # no delay: straight back to the queue
            return
        if i % 10 == 7 and msg.attempt == 1:
            twice.add(msg.id)
            raise RuntimeError("contract: fails once")  # retried with a zero backoff
        if i % 13 == 0:
            await asyncio.sleep(0.005)  # finishes out of order: the acks of a batch are not consecutive
        done.add(msg.id)  # returns: acked in a batch with the other workers' acks

    policy = RetryPolicy(max_attempts=3, initial_backoff=0.0, max_backoff=0.0)
    consumer = ctx.bus.consumer(queue, prefetch=4 * conc)
    task = ctx.background(consumer.run(handle, concurrency=conc, retry=policy))
    ctx.waiting = lambda: f"{n} messages handled by {conc} instant handlers ({done.distinct} so far)"
    await done.wait_distinct(n)
    handled = time.monotonic()
    await stop_run(consumer, task)
    await consumer.close()
    line = done.ensure_exact(set(sent), f"{n} at concurrency {conc}")
    wrong = {i: seen for i, seen in attempts.items() if seen != ([1, 2] if i in twice else [1])}
    ensure(not wrong, f"{line}; {len(wrong)} handled with the wrong attempts, e.g. {list(wrong.items())[:3]}")
    ensure(len(twice) == n // 5, f"{line}; {len(twice)} nacked or failed once, expected {n // 5}")
    quiet = await nothing_comes_back(
        ctx, lambda bus: bus.consumer(queue), sentinel_sender(producer), ctx.lock_window_after(handled)
    )
    ctx.note(f"{line}; {len(twice)} nacked or failed once, each handled again as attempt 2, then acked; {quiet}")
