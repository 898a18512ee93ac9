"""The in-process workloads: ``publish`` (single awaited sends, ``send_many`` batches, concurrent single sends;
the timed part ends when the last send returned, then the messages are drained and counted untimed) and
``latency`` (one message at a time at a fixed rate, send call to handler entry) and ``ordering`` (keyed messages
preloaded, then consumed here, counting those that overtook an earlier message of their key).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence

from ._contender import Contender, Tally, make_body, read_body

IDLE_TIMEOUT = 15.0  # seconds without a new message before a drain is declared lossy


def new_tag() -> int:
    return secrets.randbits(32)


async def drain(contender: Contender, queue: str, tally: Tally, concurrency: int, what: str) -> float:
    """Consume until ``tally`` is complete; seconds to the last one. ``LostMessages`` after ``IDLE_TIMEOUT`` idle."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def complete() -> None:  # thread-safe: a blocking contender counts on its own thread
        loop.call_soon_threadsafe(stop.set)

    tally.on_complete = complete
    start = time.perf_counter()
    if tally.complete:
        return 0.0
    task = asyncio.create_task(contender.consume(queue, tally.add, concurrency, stop))
    waiter = asyncio.create_task(stop.wait())
    last = -1
    while not waiter.done() and not task.done() and tally.distinct != last:
        last = tally.distinct
        await asyncio.wait([waiter, task], timeout=IDLE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    await waiter
    await task
    tally.check(what if tally.complete else f"{what} (nothing new for {IDLE_TIMEOUT:.0f}s)")
    return tally.completed_at - start


async def publish_run(
    contender: Contender, queue: str, n: int, size: int, mode: str, batch: int, concurrency: int
) -> float:
    """msgs/s of sending ``n`` bodies in ``mode``; then drains and counts them (untimed)."""
    tag = new_tag()
    bodies = [make_body(tag, i, size) for i in range(n)]
    start = time.perf_counter()
    await contender.publish(queue, bodies, mode, batch, concurrency)
    elapsed = time.perf_counter() - start
    await drain(contender, queue, Tally(tag, n), 16, f"{contender.name} publish {mode} {size} B")
    return n / elapsed


async def latency_run(
    contender: Contender, queue: str, n: int, size: int, rate: float, warmup: int = 100
) -> list[float]:
    """Seconds from each send call to its handler, one message every ``1/rate`` s (after ``warmup`` unmeasured)."""
    tag = new_tag()
    total = warmup + n
    stop = asyncio.Event()
    tally = Tally(tag, total, stop.set)
    measured: list[float] = []

    def on_body(body: bytes) -> None:
        now = time.perf_counter()
        _, index, sent = read_body(body)
        if index >= warmup:
            measured.append(now - sent)
        tally.add(body)

    consumer = asyncio.create_task(contender.consume(queue, on_body, 1, stop))
    loop = asyncio.get_running_loop()
    period = 1.0 / rate
    next_at = loop.time()
    try:
        for i in range(total):
            next_at += period
            await contender.send(queue, make_body(tag, i, size, time.perf_counter()))
            pause = next_at - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
        await asyncio.wait([consumer, asyncio.ensure_future(stop.wait())], timeout=IDLE_TIMEOUT)
    finally:
        stop.set()
        await consumer
    tally.check(f"{contender.name} latency")
    return measured


class OrderTally(Tally):
    """A ``Tally`` that also counts messages handed over before an earlier message of their key (key = index mod
    ``keys``, sent in index order): 0 wherever per-key order was kept."""

    def __init__(self, tag: int, expected: int, keys: int) -> None:
        super().__init__(tag, expected)
        self.keys = keys
        self.last = [-1] * keys  # the highest index seen per key
        self.out_of_order = 0

    def add(self, body: bytes) -> None:
        tag, index, _ = read_body(body)
        if tag == self.tag and index < self.expected:
            key = index % self.keys
            if index < self.last[key]:
                self.out_of_order += 1
            self.last[key] = max(self.last[key], index)
        super().add(body)


async def ordering_run(
    contender: Contender, queue: str, n: int, size: int, keys: int, batch: int, concurrency: int
) -> tuple[float, int]:
    """msgs/s of consuming ``n`` preloaded messages on ``keys`` keys in this process (the contender sends them with
    their keys), and how many arrived before an earlier message of their key."""
    tag = new_tag()
    await contender.publish(queue, [make_body(tag, i, size) for i in range(n)], "batch", batch, 1)
    tally = OrderTally(tag, n, keys)
    seconds = await drain(contender, queue, tally, concurrency, f"{contender.name} ordering, {keys} keys")
    return n / seconds, tally.out_of_order


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50/p99/p99.9 in milliseconds."""
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50": at(0.50), "p99": at(0.99), "p99.9": at(0.999)}
