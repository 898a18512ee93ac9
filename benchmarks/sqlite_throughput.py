"""Durable throughput of the ``sqlite://`` backend with two processes: one producer, one consumer.

The producer sends ``--messages`` messages of ``--size`` bytes in batches (``send_many``) from
``--concurrency`` tasks; the consumer receives batches and acks them (one ``ack_many`` per batch, or one
``ack`` per message with ``--ack single``); ``--api public`` does the same through ``msgbus.connect``,
``send_many`` and ``consumer.run(handler, concurrency=64)``. Prints msgs/s for the producer, the consumer,
and end to end (first send to last ack). Run: ``python benchmarks/sqlite_throughput.py [--synchronous full]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import msgbus
from msgbus._sqlite import create
from msgbus._url import parse_url
from msgbus.adapter import Adapter, Endpoint, Record

QUEUE = Endpoint("queue", "bench")


def _adapter(url: str) -> Adapter:
    parsed = parse_url(url)
    return create(parsed, parsed.reader())


async def produce(url: str, messages: int, size: int, batch: int, concurrency: int) -> dict[str, Any]:
    adapter = _adapter(url)
    await adapter.open()
    await adapter.declare(QUEUE)
    body = os.urandom(size)
    batches = [range(i, min(i + batch, messages)) for i in range(0, messages, batch)]

    async def sender(mine: list[range]) -> None:
        for ids in mine:
            await adapter.send(QUEUE, [Record(body, f"m{i}", timestamp=time.time()) for i in ids])

    start = time.time()
    await asyncio.gather(*(sender(batches[k::concurrency]) for k in range(concurrency)))
    end = time.time()
    await adapter.close()
    return {"start": start, "end": end, "count": messages}


async def consume(url: str, messages: int, batch: int, ack: str) -> dict[str, Any]:
    adapter = _adapter(url)
    await adapter.open()
    await adapter.declare(QUEUE)
    receiver = await adapter.receiver(QUEUE, prefetch=2 * batch)
    print("ready", flush=True)
    seen: set[str] = set()
    received = 0
    start = 0.0
    acking: asyncio.Future[Any] | None = None
    while len(seen) < messages:
        got = await receiver.receive(batch, timeout=30.0)
        if not got:
            break
        if not start:
            start = time.time()
        received += len(got)
        seen.update(d.record.id for d in got)
        if acking is not None:
            await acking
        # The ack of this batch overlaps the next receive (both go into one transaction), as the
        # consume runtime's concurrent workers do.
        if ack == "many":
            acking = asyncio.ensure_future(receiver.ack_many(got))
        else:
            acking = asyncio.gather(*(d.ack() for d in got))
    if acking is not None:
        await acking
    end = time.time()
    await receiver.close()
    await adapter.close()
    return {"start": start, "end": end, "count": len(seen), "duplicates": received - len(seen)}


async def produce_public(url: str, messages: int, size: int, batch: int, concurrency: int) -> dict[str, Any]:
    async with msgbus.connect(url) as bus:
        producer = bus.producer(QUEUE.name)
        await producer.send(b"warm-up")  # declares the queue; the consumer skips it
        body = os.urandom(size)
        counts = [min(batch, messages - i) for i in range(0, messages, batch)]

        async def sender(mine: list[int]) -> None:
            for n in mine:
                await producer.send_many([body] * n)

        start = time.time()
        await asyncio.gather(*(sender(counts[k::concurrency]) for k in range(concurrency)))
        end = time.time()
    return {"start": start, "end": end, "count": messages}


async def consume_public(url: str, messages: int, batch: int) -> dict[str, Any]:
    """``consumer.run`` with 64 concurrent handlers: each message acked on its own by the runtime."""
    seen: set[str] = set()
    received = 0
    start = 0.0
    async with msgbus.connect(url) as bus, bus.consumer(QUEUE.name, prefetch=2 * batch) as consumer:
        print("ready", flush=True)

        async def handle(msg: msgbus.Message[Any]) -> None:
            nonlocal received, start
            if msg.payload == b"warm-up":
                return
            if not start:
                start = time.time()
            received += 1
            seen.add(msg.id)
            if len(seen) >= messages:
                consumer.stop()

        await consumer.run(handle, concurrency=64)
        end = time.time()
    return {"start": start, "end": end, "count": len(seen), "duplicates": received - len(seen)}


def child(args: argparse.Namespace) -> None:
    url, n, size, batch, concurrency = args.url, args.messages, args.size, args.batch, args.concurrency
    if args.role == "producer":
        make = produce_public if args.api == "public" else produce
        result = asyncio.run(make(url, n, size, batch, concurrency))
    elif args.api == "public":
        result = asyncio.run(consume_public(url, n, batch))
    else:
        result = asyncio.run(consume(url, n, batch, args.ack))
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=100, help="messages per send_many and per receive")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent send tasks in the producer")
    parser.add_argument("--ack", choices=("many", "single"), default="many")
    parser.add_argument("--synchronous", choices=("normal", "full"), default="normal")
    parser.add_argument(
        "--api", choices=("spi", "public"), default="spi", help="adapter SPI, or msgbus.connect + consumer.run"
    )
    parser.add_argument("--role", choices=("producer", "consumer"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db?synchronous={args.synchronous}"
        common = [
            *("--messages", str(args.messages), "--size", str(args.size), "--batch", str(args.batch)),
            *("--concurrency", str(args.concurrency), "--ack", args.ack, "--api", args.api, "--url", url),
        ]
        me = [sys.executable, __file__, *common]
        consumer = subprocess.Popen([*me, "--role", "consumer"], stdout=subprocess.PIPE, text=True)
        assert consumer.stdout is not None
        consumer.stdout.readline()  # "ready": queue declared, receiver polling
        producer = subprocess.Popen([*me, "--role", "producer"], stdout=subprocess.PIPE, text=True)
        p_out, _ = producer.communicate()
        c_out, _ = consumer.communicate()
        if producer.returncode or consumer.returncode:
            sys.exit(f"benchmark child failed (producer {producer.returncode}, consumer {consumer.returncode})")
        prod, cons = json.loads(p_out), json.loads(c_out)

    n = args.messages
    print(
        f"sqlite:// two processes, {n} x {args.size} B, batch {args.batch}, {args.concurrency} send tasks, "
        f"{'consumer.run(concurrency=64)' if args.api == 'public' else 'ack=' + args.ack}, "
        f"api={args.api}, synchronous={args.synchronous}"
    )
    print(f"  producer   {n / (prod['end'] - prod['start']):>10,.0f} msgs/s")
    print(f"  consumer   {cons['count'] / (cons['end'] - cons['start']):>10,.0f} msgs/s")
    print(f"  end to end {cons['count'] / (cons['end'] - prod['start']):>10,.0f} msgs/s")
    print(f"  received {cons['count']} of {n}, duplicates {cons['duplicates']}, lost {n - cons['count']}")


if __name__ == "__main__":
    main()
