"""Throughput of the ``kafka://`` adapter at the SPI level vs raw aiokafka, same broker, same run.

Both sides do the same work on 1 KiB messages (``--size``) in batches of ``--batch``, on a fresh topic of
``--partitions`` partitions:

* send: an idempotent ``acks=all`` producer; every record of a batch is handed to the producer, then all
  acknowledgements are awaited (msgbus: ``Adapter.send`` with the batch; raw: ``producer.send`` per record
  with the same headers msgbus writes, then ``gather``);
* consume: a consumer group member with manual commits (msgbus: ``Receiver.receive`` + ``ack_many``, which
  commits the delivery notes per receive and the settled offsets in the background; raw: ``getmany`` of up
  to a batch, then ``commit()`` of the batch).

Phases run one after the other in one process (send N, then consume N), alternating raw and msgbus for
``--rounds`` rounds; the median of each is printed with the msgbus/raw ratio. Every round checks that
N distinct messages were received (0 lost, duplicates counted).

Run: ``python benchmarks/kafka_vs_raw.py [--url kafka://127.0.0.1:9092] [--messages 20000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]

from msgbus._url import parse_url
from msgbus.adapter import Endpoint, Record
from msgbus_kafka import create

Phase = tuple[float, float, int]  # send seconds, consume seconds, duplicates


async def run_msgbus(url: str, topic: str, n: int, size: int, batch: int, partitions: int) -> Phase:
    parsed = parse_url(url)
    reader = parsed.reader({"partitions": partitions})
    adapter = create(parsed, reader)
    reader.finish()
    await adapter.open()
    queue = Endpoint("queue", topic)
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
        got = await receiver.receive(batch, 10.0)
        if not got:
            raise SystemExit(f"msgbus: only {len(seen)} of {n} received")
        received += len(got)
        seen.update(d.record.id for d in got)
        await receiver.ack_many(got)
    done = time.perf_counter()
    await receiver.close()
    await adapter.close()
    return sent - start, done - sent, received - len(seen)


async def run_raw(url: str, topic: str, n: int, size: int, batch: int, partitions: int) -> Phase:
    bootstrap = url.split("://", 1)[1].split("?", 1)[0]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, partitions, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    body = os.urandom(size)
    start = time.perf_counter()
    for i in range(0, n, batch):
        now = repr(time.time()).encode()
        acks = []
        for j in range(i, min(i + batch, n)):
            headers = [("x-msgbus-id", f"m{j}".encode()), ("x-msgbus-timestamp", now)]
            acks.append(await producer.send(topic, body, headers=headers))
        await asyncio.gather(*acks)
    sent = time.perf_counter()
    await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"{topic}-raw",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=batch,
    )
    await consumer.start()
    seen: set[bytes] = set()
    received = 0
    while len(seen) < n:
        batches = await consumer.getmany(timeout_ms=10_000, max_records=batch)
        if not batches:
            raise SystemExit(f"raw: only {len(seen)} of {n} received")
        for records in batches.values():
            received += len(records)
            seen.update(dict(r.headers)["x-msgbus-id"] for r in records)
        await consumer.commit()
    done = time.perf_counter()
    await consumer.stop()
    return sent - start, done - sent, received - len(seen)


async def main_async(args: argparse.Namespace) -> None:
    runners: dict[str, Callable[[str, str, int, int, int, int], Awaitable[Phase]]] = {
        "raw aiokafka": run_raw,
        "msgbus kafka://": run_msgbus,
    }
    results: dict[str, list[Phase]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            topic = "bench-" + secrets.token_hex(4)
            results[name].append(await runner(args.url, topic, args.messages, args.size, args.batch, args.partitions))

    n = args.messages
    print(
        f"{n} x {args.size} B, batch {args.batch}, {args.partitions} partitions, median of {args.rounds} rounds, msgs/s"
    )
    print(f"{'':18}{'send':>10}{'consume':>10}{'send+consume':>14}{'dups':>6}")
    medians: dict[str, tuple[float, float, float]] = {}
    for name, phases in results.items():
        send = statistics.median(n / p[0] for p in phases)
        consume = statistics.median(n / p[1] for p in phases)
        both = statistics.median(n / (p[0] + p[1]) for p in phases)
        medians[name] = (send, consume, both)
        print(f"{name:18}{send:>10,.0f}{consume:>10,.0f}{both:>14,.0f}{sum(p[2] for p in phases):>6}")
    raw, ours = medians["raw aiokafka"], medians["msgbus kafka://"]
    print(f"{'msgbus / raw':18}" + "".join(f"{o / r:>{w}.2f}" for o, r, w in zip(ours, raw, (10, 10, 14), strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("MSGBUS_TEST_KAFKA_URL", "kafka://127.0.0.1:9092"))
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
