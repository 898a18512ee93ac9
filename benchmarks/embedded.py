"""Throughput of the embedded backends through the public API: send + consume with ack.

memory://: one process, producer and consumer running concurrently.
sqlite://: two processes (a producer process and a consumer process) sharing one database file.
Each run counts every message and fails loudly if one is lost or duplicated.

    python benchmarks/embedded.py [--messages N] [--size BYTES] [--runs R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgbus

BATCH = 500


async def _produce(url: str, queue: str, n: int, size: int) -> None:
    body = b"x" * size
    async with msgbus.connect(url) as bus:
        producer = bus.producer(queue)
        for start in range(0, n, BATCH):
            await producer.send_many([body] * min(BATCH, n - start))


async def _consume(url: str, queue: str, n: int, concurrency: int) -> tuple[int, int]:
    """Consume until n distinct messages were handled; returns (handled, duplicates)."""
    seen: set[str] = set()
    dup = 0
    done = asyncio.Event()
    async with msgbus.connect(url) as bus:
        consumer = bus.consumer(queue, prefetch=max(256, 2 * concurrency))

        async def handle(msg: msgbus.Message) -> None:
            nonlocal dup
            if msg.id in seen:
                dup += 1
            seen.add(msg.id)
            if len(seen) >= n:
                done.set()

        task = asyncio.create_task(consumer.run(handle, concurrency=concurrency))
        await done.wait()
        consumer.stop()
        await task
    return len(seen), dup


async def memory_run(n: int, size: int, concurrency: int) -> float:
    url = f"memory://bench-{uuid.uuid4().hex}"
    queue = "bench"
    async with msgbus.connect(url) as bus:  # keep the namespace alive for both sides
        await bus.producer(queue).send_many([])
        start = time.perf_counter()
        consumed = asyncio.create_task(_consume(url, queue, n, concurrency))
        await _produce(url, queue, n, size)
        handled, dup = await consumed
        elapsed = time.perf_counter() - start
    _check(n, handled, dup)
    return n / elapsed


def _consumer_process(url: str, queue: str, n: int, concurrency: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    handled, dup = asyncio.run(_consume(url, queue, n, concurrency))
    out.put((time.time(), handled, dup))


def _producer_process(url: str, queue: str, n: int, size: int) -> None:
    asyncio.run(_produce(url, queue, n, size))


def sqlite_run(n: int, size: int, concurrency: int, directory: Path) -> float:
    url = f"sqlite:///{directory}/bench-{uuid.uuid4().hex}.db"
    queue = "bench"
    asyncio.run(_produce(url, queue, 0, size))  # create the file before timing
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    consumer = ctx.Process(target=_consumer_process, args=(url, queue, n, concurrency, out))
    producer = ctx.Process(target=_producer_process, args=(url, queue, n, size))
    consumer.start()
    time.sleep(1.0)  # let the consumer import and connect before the clock starts
    start = time.time()
    producer.start()
    producer.join()
    end, handled, dup = out.get(timeout=600)
    consumer.join()
    _check(n, handled, dup)
    return n / (end - start)


def _check(n: int, handled: int, dup: int) -> None:
    if handled != n or dup:
        raise SystemExit(f"LOST OR DUPLICATED: sent {n}, handled {handled}, duplicates {dup}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"memory": [], "sqlite": []}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            results["memory"].append(asyncio.run(memory_run(args.messages, args.size, args.concurrency)))
            results["sqlite"].append(sqlite_run(args.messages, args.size, args.concurrency, Path(tmp)))
            print(
                f"run {run + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1]:,.0f} msgs/s" for k, v in results.items()),
                file=sys.stderr,
            )
    summary = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for k, v in results.items()}
    for k, s in summary.items():
        print(
            f"{k:7s} {args.size} B: median {s['median']:,.0f} msgs/s (min {s['min']:,.0f}, max {s['max']:,.0f}), "
            f"{args.messages} messages x {args.runs} runs, 0 lost"
        )
    if args.json:
        args.json.write_text(json.dumps({"messages": args.messages, "size": args.size, "results": summary}, indent=2))


if __name__ == "__main__":
    main()
