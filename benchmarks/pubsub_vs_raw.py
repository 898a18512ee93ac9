"""Throughput of the ``pubsub://`` adapter at the SPI level vs the raw google-cloud-pubsub client, same run.

Both sides do the same work on 1 KiB messages (``--size``) in batches of ``--batch``, on the same endpoint
(the local pstest server, or any emulator in ``PUBSUB_EMULATOR_HOST``):

* send: a batch is handed to the library's batching ``PublisherClient`` and every publish future is awaited
  (msgbus: ``Adapter.send`` with the batch, which adds the ``x-msgbus-*`` attributes; raw: ``publish`` with
  the same attributes msgbus writes, futures awaited through ``asyncio.wrap_future``);
* consume: a unary ``Pull`` of up to a batch, then one ``Acknowledge`` of the batch (msgbus:
  ``Receiver.receive`` + ``ack_many``, which also shortens each message's ack deadline when it is below the
  subscription's; raw: ``SubscriberAsyncClient.pull`` + ``acknowledge``).

Phases run one after the other (send N, then consume N), alternating raw and msgbus for ``--rounds`` rounds;
the median of each is printed with the msgbus/raw ratio. Every round checks that N distinct messages were
received (0 lost; duplicates counted).

Run: ``python benchmarks/pubsub_vs_raw.py [--emulator 127.0.0.1:8085] [--messages 5000]``
(start the server first: ``python -m integration.brokers start pubsub``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable

import grpc  # type: ignore[import-untyped]
from google.cloud import pubsub_v1  # type: ignore[import-untyped]
from google.pubsub_v1 import PublisherAsyncClient, SubscriberAsyncClient
from google.pubsub_v1.services.publisher.transports import PublisherGrpcAsyncIOTransport, PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcAsyncIOTransport

from msgbus._url import parse_url
from msgbus.adapter import Endpoint, Record
from msgbus_pubsub import create

Phase = tuple[float, float, int]  # send seconds, consume seconds, duplicates
PROJECT = "msgbus-bench"
_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


async def run_msgbus(host: str, name: str, n: int, size: int, batch: int) -> Phase:
    url = parse_url(f"pubsub://{PROJECT}?emulator_host={host}&ack_deadline=60")
    reader = url.reader()
    adapter = create(url, reader)
    reader.finish()
    await adapter.open()
    queue = Endpoint("queue", name)
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


async def run_raw(host: str, name: str, n: int, size: int, batch: int) -> Phase:
    publisher = pubsub_v1.PublisherClient(
        pubsub_v1.types.BatchSettings(max_messages=1000, max_bytes=9_000_000, max_latency=0.005),
        transport=PublisherGrpcTransport(channel=grpc.insecure_channel(host, options=_OPTIONS)),
    )
    admin = PublisherAsyncClient(
        transport=PublisherGrpcAsyncIOTransport(channel=grpc.aio.insecure_channel(host, options=_OPTIONS))
    )
    subscriber = SubscriberAsyncClient(
        transport=SubscriberGrpcAsyncIOTransport(channel=grpc.aio.insecure_channel(host, options=_OPTIONS))
    )
    topic = f"projects/{PROJECT}/topics/{name}-raw"
    subscription = f"projects/{PROJECT}/subscriptions/{name}-raw"
    await admin.create_topic(request={"name": topic})
    await subscriber.create_subscription(request={"name": subscription, "topic": topic, "ack_deadline_seconds": 60})
    body = os.urandom(size)
    start = time.perf_counter()
    for i in range(0, n, batch):
        now = repr(time.time())
        futures = [
            asyncio.wrap_future(publisher.publish(topic, body, **{"x-msgbus-id": f"m{j}", "x-msgbus-timestamp": now}))
            for j in range(i, min(i + batch, n))
        ]
        await asyncio.gather(*futures)
    sent = time.perf_counter()
    seen: set[str] = set()
    received = 0
    while len(seen) < n:
        response = await subscriber.pull(request={"subscription": subscription, "max_messages": batch}, timeout=7.0)
        got = list(response.received_messages)
        if not got:
            raise SystemExit(f"raw: only {len(seen)} of {n} received")
        received += len(got)
        seen.update(m.message.attributes["x-msgbus-id"] for m in got)
        await subscriber.acknowledge(request={"subscription": subscription, "ack_ids": [m.ack_id for m in got]})
    done = time.perf_counter()
    await asyncio.to_thread(publisher.stop)
    for client in (admin, subscriber):
        await client.transport.close()
    return sent - start, done - sent, received - len(seen)


async def main_async(args: argparse.Namespace) -> None:
    runners: dict[str, Callable[[str, str, int, int, int], Awaitable[Phase]]] = {
        "raw google-cloud": run_raw,
        "msgbus pubsub://": run_msgbus,
    }
    results: dict[str, list[Phase]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            queue = "bench-" + secrets.token_hex(4)
            results[name].append(await runner(args.emulator, queue, args.messages, args.size, args.batch))

    n = args.messages
    print(f"{n} x {args.size} B, batch {args.batch}, median of {args.rounds} rounds, msgs/s ({args.emulator})")
    print(f"{'':18}{'send':>10}{'consume':>10}{'send+consume':>14}{'dups':>6}")
    medians: dict[str, tuple[float, float, float]] = {}
    for name, phases in results.items():
        send = statistics.median(n / p[0] for p in phases)
        consume = statistics.median(n / p[1] for p in phases)
        both = statistics.median(n / (p[0] + p[1]) for p in phases)
        medians[name] = (send, consume, both)
        print(f"{name:18}{send:>10,.0f}{consume:>10,.0f}{both:>14,.0f}{sum(p[2] for p in phases):>6}")
    raw, ours = medians["raw google-cloud"], medians["msgbus pubsub://"]
    print(f"{'msgbus / raw':18}" + "".join(f"{o / r:>{w}.2f}" for o, r, w in zip(ours, raw, (10, 10, 14), strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emulator", default=os.environ.get("PUBSUB_EMULATOR_HOST", "127.0.0.1:8085"))
    parser.add_argument("--messages", type=int, default=5_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
