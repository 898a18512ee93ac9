"""Throughput of the ``redis://`` adapter at the SPI level vs raw redis-py streams, same Redis, same run.

Both sides do the same work on 1 KiB messages (``--size``) in batches of ``--batch``:

* send: one pipelined round trip of XADDs per batch (msgbus: ``Adapter.send`` with the batch; raw:
  ``pipeline(transaction=False)`` of ``xadd`` with the same fields msgbus writes: body, id, timestamp);
* consume: XREADGROUP of up to a batch, then XACK + XDEL of the batch in one round trip (msgbus:
  ``Receiver.receive`` + ``ack_many``; raw: ``xreadgroup`` + a pipelined ``xack``/``xdel``).

Phases run one after the other in one process (send N, then consume N), alternating raw and msgbus for
``--rounds`` rounds; the median of each is printed with the msgbus/raw ratio. Every round checks that
N distinct messages were received (0 lost, duplicates counted).

Run: ``python benchmarks/redis_vs_raw.py [--url redis://127.0.0.1:6379/0] [--messages 20000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio

from msgbus._url import parse_url
from msgbus.adapter import Endpoint, Record
from msgbus_redis import create

Phase = tuple[float, float, int]  # send seconds, consume seconds, duplicates


async def run_msgbus(url: str, prefix: str, n: int, size: int, batch: int) -> Phase:
    parsed = parse_url(url)
    reader = parsed.reader({"prefix": prefix})
    adapter = create(parsed, reader)
    reader.finish()
    await adapter.open()
    queue = Endpoint("queue", "bench")
    await adapter.declare(queue)
    body = os.urandom(size)
    start = time.perf_counter()
    for i in range(0, n, batch):
        now = time.time()
        await adapter.send(queue, [Record(body, f"m{j}", timestamp=now) for j in range(i, min(i + batch, n))])
    sent = time.perf_counter()
    receiver = await adapter.receiver(queue, prefetch=batch)
    seen: set[str] = set()
    received = 0
    while len(seen) < n:
        got = await receiver.receive(batch, 5.0)
        if not got:
            raise SystemExit(f"msgbus: only {len(seen)} of {n} received")
        received += len(got)
        seen.update(d.record.id for d in got)
        await receiver.ack_many(got)
    done = time.perf_counter()
    await receiver.close()
    await adapter.close()
    return sent - start, done - sent, received - len(seen)


async def run_raw(url: str, prefix: str, n: int, size: int, batch: int) -> Phase:
    client = redis.asyncio.Redis.from_url(url, protocol=2)  # as the adapter
    stream, group = f"{prefix}:raw", "bench"
    await client.xgroup_create(stream, group, id="0", mkstream=True)
    body = os.urandom(size)
    start = time.perf_counter()
    for i in range(0, n, batch):
        now = repr(time.time()).encode()
        pipe = client.pipeline(transaction=False)
        for j in range(i, min(i + batch, n)):
            pipe.xadd(stream, {b"body": body, b"id": f"m{j}".encode(), b"timestamp": now})
        await pipe.execute()
    sent = time.perf_counter()
    seen: set[bytes] = set()
    received = 0
    while len(seen) < n:
        reply: Any = await client.xreadgroup(group, "c1", {stream: ">"}, count=batch, block=5000)
        if not reply:
            raise SystemExit(f"raw: only {len(seen)} of {n} received")
        entries = reply[0][1]
        ids = [entry_id for entry_id, _ in entries]
        received += len(entries)
        seen.update(fields[b"id"] for _, fields in entries)
        pipe = client.pipeline(transaction=True)
        pipe.xack(stream, group, *ids)
        pipe.xdel(stream, *ids)
        await pipe.execute()
    done = time.perf_counter()
    await client.delete(stream)
    await client.aclose()
    return sent - start, done - sent, received - len(seen)


async def cleanup(url: str, prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def main_async(args: argparse.Namespace) -> None:
    runners: dict[str, Callable[[str, str, int, int, int], Awaitable[Phase]]] = {
        "raw redis-py": run_raw,
        "msgbus redis://": run_msgbus,
    }
    results: dict[str, list[Phase]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            prefix = "bench-" + secrets.token_hex(4)
            try:
                results[name].append(await runner(args.url, prefix, args.messages, args.size, args.batch))
            finally:
                await cleanup(args.url, prefix)

    n = args.messages
    print(f"{n} x {args.size} B, batch {args.batch}, median of {args.rounds} rounds, msgs/s")
    print(f"{'':18}{'send':>10}{'consume':>10}{'send+consume':>14}{'dups':>6}")
    medians: dict[str, tuple[float, float, float]] = {}
    for name, phases in results.items():
        send = statistics.median(n / p[0] for p in phases)
        consume = statistics.median(n / p[1] for p in phases)
        both = statistics.median(n / (p[0] + p[1]) for p in phases)
        medians[name] = (send, consume, both)
        print(f"{name:18}{send:>10,.0f}{consume:>10,.0f}{both:>14,.0f}{sum(p[2] for p in phases):>6}")
    raw, ours = medians["raw redis-py"], medians["msgbus redis://"]
    print(f"{'msgbus / raw':18}" + "".join(f"{o / r:>{w}.2f}" for o, r, w in zip(ours, raw, (10, 10, 14), strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("MSGBUS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
