"""Checks for promise 13 (delivery limit) and the ack bound: consumer processes that die hard mid-stream."""

from __future__ import annotations

import asyncio
import math
import signal
from collections import Counter
from typing import Any

from msgbus import HEADER_ATTEMPTS, HEADER_DEAD_LETTER_REASON, Message, Outgoing
from msgbus._runtime import ACK_DELAY

from ._context import ContractContext, Tally, ensure, examples, fail
from ._crash import start_worker, worker_error
from ._flow import chunked
from .worker import EXIT_CODE, HANDLED, POISON_HEADER

__all__ = ["acks_bound", "check_acks_survive_crash", "check_poison_kills_consumer"]

MAX_ATTEMPTS = 3
SPIN = 0.005  # seconds of CPU each handler of the ack check burns without awaiting


async def check_poison_kills_consumer(ctx: ContractContext) -> None:
    """A message that kills its consumer process is handled at most max_attempts times, then dead-lettered
    with the reason; every other message is processed."""
    n = ctx.scale(60, 30)
    at = n // 3  # messages queued behind it are what a poison loop used to starve
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    # The poison and the three after it share a key: where keys are ordered, those wait behind it.
    items = [
        Outgoing(
            {"i": i}, key="poison" if at <= i <= at + 3 else None, headers={POISON_HEADER: "1"} if i == at else None
        )
        for i in range(n)
    ]
    ids = await producer.send_many(items)
    poison = ids[at]
    others = set(ids) - {poison}
    handled: Counter[str] = Counter()
    poison_attempts: list[int] = []
    dead = Tally()
    reasons: dict[str, tuple[str, str]] = {}

    reading = True

    async def read_dead_letters() -> None:
        dlq = ctx.bus.dead_letters(queue)
        while reading:  # not cancelled mid-receive: some clients leak the connection of a cancelled call
            for msg in await dlq.receive(max_messages=50, timeout=0.5):
                dead.add(msg.id)
                reasons[msg.id] = (msg.headers.get(HEADER_DEAD_LETTER_REASON, ""), msg.headers.get(HEADER_ATTEMPTS, ""))
                await msg.ack()

    def progress() -> str:
        return (
            f"{len(others & set(handled))} of {len(others)} others handled, the poison handled "
            f"{len(poison_attempts)} times (attempts {poison_attempts}), dead letters: {dead.distinct}"
        )

    def done() -> bool:
        return poison in dead and others <= set(handled)

    reader = ctx.background(read_dead_letters(), "dead letters")
    rounds = 0
    while not done():
        rounds += 1
        proc = await start_worker(ctx, queue, "poison", str(MAX_ATTEMPTS))
        assert proc.stdout is not None
        ctx.waiting = lambda r=rounds: f"worker process {r}: {progress()}"
        lines = asyncio.ensure_future(proc.stdout.readline())
        while not done():
            finished, _ = await asyncio.wait([lines], timeout=0.2)
            if not finished:
                innocent = set(dead.counts) - {poison}
                ensure(not innocent, f"dead-lettered with the poison: {examples(innocent)}; {progress()}")
                continue
            line = lines.result().decode().split()
            if not line:  # the worker exited
                break
            lines = asyncio.ensure_future(proc.stdout.readline())
            if line[0] == HANDLED:
                handled[line[1]] += 1
                if line[1] == poison:
                    poison_attempts.append(int(line[2]))
                    ensure(
                        len(poison_attempts) <= MAX_ATTEMPTS,
                        f"the poison was handled {len(poison_attempts)} times with max_attempts={MAX_ATTEMPTS} "
                        f"(attempts {poison_attempts}); {progress()}",
                    )
        lines.cancel()
        if not done():
            await proc.wait()
            if proc.returncode != EXIT_CODE:
                fail(f"worker process {rounds} {await worker_error(proc)}; {progress()}")
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)  # the last one stops gracefully: its acks go out
        await proc.wait()

    leftovers = await _leftovers(ctx, queue)  # meanwhile the reader sees any late dead letter
    reading = False
    await reader
    innocent = set(dead.counts) - {poison}
    ensure(not innocent, f"dead-lettered with the poison: {examples(innocent)}; {progress()}")
    reason, attempts = reasons[poison]
    ensure(
        f"delivered {attempts} times" in reason and int(attempts) > MAX_ATTEMPTS,
        f"the poison's dead-letter reason {reason!r} (attempts {attempts!r}) does not say it was delivered more "
        f"than max_attempts={MAX_ATTEMPTS} times",
    )
    stuck = leftovers - set(handled)
    ensure(not stuck, f"{len(stuck)} messages never handled were left in the queue, e.g. {examples(stuck)}")
    dups = sum(c - 1 for i, c in handled.items() if i != poison)
    ctx.note(
        f"{n} sent, one poison at position {at + 1} killed the worker process {len(poison_attempts)} times "
        f"(attempts {poison_attempts}, max_attempts={MAX_ATTEMPTS}) and was dead-lettered: {reason!r}; "
        f"{len(others)} others handled by {rounds} worker processes, 0 lost, {dups} dup, "
        f"{len(leftovers)} redelivered after the last one stopped"
    )


async def check_acks_survive_crash(ctx: ContractContext) -> None:
    """A consumer whose handler never awaits dies after handling K messages: at most the acks in flight
    (the documented bound) come back."""
    k = ctx.scale(200, 100)
    n = k + ctx.scale(100, 50)
    prefetch = 256  # a deep buffer: holding acks until it is empty would lose the most
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    sent: list[str] = []
    for chunk in chunked(range(n), 250):
        sent += await producer.send_many([{"i": i} for i in chunk])
    proc = await start_worker(ctx, queue, "acks", str(k), str(SPIN), str(prefetch))
    assert proc.stdout is not None
    handled: list[str] = []
    ctx.waiting = lambda: f"the worker process to handle {k} messages ({len(handled)} so far)"
    while line := (await proc.stdout.readline()).decode().split():
        if line[0] == HANDLED:
            handled.append(line[1])
    await proc.wait()
    if proc.returncode != EXIT_CODE or len(handled) != k:
        fail(f"the worker process handled {len(handled)} of {k} messages and {await worker_error(proc)}")
    survivor = (await ctx.open_bus()).consumer(queue, prefetch=100)
    tally = Tally()
    rest = set(sent) - set(handled)
    ctx.waiting = lambda: f"the {len(rest)} messages not handled ({len(rest & set(tally.counts))} so far)"
    while not rest <= set(tally.counts):
        for msg in await survivor.receive(max_messages=100, timeout=1.0):
            tally.add(msg.id)
            await msg.ack()
    ctx.waiting = "redeliveries after the others arrived"
    tally_more = await _leftovers(ctx, queue, survivor)
    for msg_id in tally_more:
        tally.add(msg_id)
    lost = set(sent) - set(handled) - set(tally.counts)
    redelivered = set(handled) & set(tally.counts)
    bound = acks_bound(SPIN, ctx.caps.ack_delay)
    ensure(not lost, f"{len(lost)} messages lost, e.g. {examples(lost)}")
    ensure(
        len(redelivered) <= bound,
        f"{len(redelivered)} of the {k} messages whose handlers had returned came back after the crash; the ack "
        f"bound allows {bound} (handlers of {SPIN * 1000:g} ms, ack delay {ACK_DELAY} s)",
    )
    ctx.note(
        f"{n} sent, the worker process handled {k} with a handler that never awaits ({SPIN * 1000:g} ms of CPU "
        f"each, prefetch {prefetch}) and died in the next: {len(redelivered)} of the {k} redelivered (bound "
        f"{bound}), 0 lost"
    )


def acks_bound(spin: float, adapter_delay: float) -> int:
    """How many messages whose handlers returned a crash may re-deliver, for handlers taking ``spin`` seconds.

    An ack waits at most ``ACK_DELAY`` (checked between handlers) before the runtime waits for the flush to
    take it, and one batch is in flight meanwhile: two windows of what is handled in ACK_DELAY. An adapter
    that holds acks before they are durable (``capabilities.ack_delay``, Kafka's commit interval) is made to
    commit at least every ack_delay, at the next such check: add what is handled in that time.
    """
    window = math.ceil(ACK_DELAY / spin) + 2  # the first and the one that made it late, at the edges
    extra = math.ceil((adapter_delay + ACK_DELAY) / spin) if adapter_delay else 0
    return 2 * window + extra


async def _leftovers(ctx: ContractContext, queue: str, consumer: Any = None) -> set[str]:
    """What the queue still delivers over a lock-length window (acked as it comes)."""
    consumer = consumer or (await ctx.open_bus()).consumer(queue)
    got: set[str] = set()
    loop = asyncio.get_running_loop()
    end = loop.time() + ctx.lock_window
    ctx.waiting = f"a {ctx.lock_window:.1f}s window for redeliveries"
    while (left := end - loop.time()) > 0:
        batch: list[Message[Any]] = await consumer.receive(max_messages=100, timeout=left)
        for msg in batch:
            got.add(msg.id)
            await msg.ack()
    return got
