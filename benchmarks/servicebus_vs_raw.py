"""Throughput of the ``servicebus://`` adapter at the SPI level vs the raw azure-servicebus aio SDK, same
endpoint, same run.

Both sides do the same work on 1 KiB messages (``--size``) in batches of ``--batch``:

* send: one ``ServiceBusMessageBatch`` per batch (msgbus: ``Adapter.send`` with the batch, which encodes
  headers/key/timestamp as application properties; raw: ``ServiceBusMessage(body, message_id=...)``);
* consume: peek-lock ``receive_messages`` of up to a batch, then ``complete_message`` for each (msgbus:
  ``Receiver.receive`` + ``ack_many``).

Phases run one after the other (send N, then consume N), alternating raw and msgbus for ``--rounds``
rounds on fresh queues; medians are printed with the msgbus/raw ratio. Every round checks that N
distinct messages were received (0 lost, duplicates counted).

Run: ``python benchmarks/servicebus_vs_raw.py [--url servicebus://...] [--messages 5000]``; the default URL
is the local test broker (``python -m integration.brokers start servicebus``). Figures against the test
broker measure client overhead, not the service.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

from azure.servicebus import ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient

from msgbus._url import parse_url
from msgbus.adapter import Endpoint, Record
from msgbus_servicebus import create
from msgbus_servicebus._config import read_options

Phase = tuple[float, float, int]  # send seconds, consume seconds, duplicates


async def run_msgbus(url: str, queue_name: str, n: int, size: int, batch: int) -> Phase:
    parsed = parse_url(url)
    reader = parsed.reader()
    adapter = create(parsed, reader)
    reader.finish()
    await adapter.open()
    queue = Endpoint("queue", queue_name)
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


async def run_raw(url: str, queue_name: str, n: int, size: int, batch: int) -> Phase:
    parsed = parse_url(url)
    options = read_options(parsed, parsed.reader())
    body = os.urandom(size)
    async with ServiceBusClient.from_connection_string(options.connection_string) as client:
        async with client.get_queue_sender(queue_name) as sender:
            start = time.perf_counter()
            for i in range(0, n, batch):
                message_batch = await sender.create_message_batch()
                for j in range(i, min(i + batch, n)):
                    message_batch.add_message(ServiceBusMessage(body, message_id=f"m{j}"))
                await sender.send_messages(message_batch)
            sent = time.perf_counter()
        async with client.get_queue_receiver(queue_name, prefetch_count=0) as receiver:
            seen: set[str] = set()
            received = 0
            while len(seen) < n:
                got = await receiver.receive_messages(max_message_count=batch, max_wait_time=5.0)
                if not got:
                    raise SystemExit(f"raw: only {len(seen)} of {n} received")
                received += len(got)
                seen.update(str(m.message_id) for m in got)
                for message in got:
                    await receiver.complete_message(message)
            done = time.perf_counter()
    return sent - start, done - sent, received - len(seen)


async def main_async(args: argparse.Namespace) -> None:
    runners: dict[str, Callable[[str, str, int, int, int], Awaitable[Phase]]] = {
        "raw azure-servicebus aio": run_raw,
        "msgbus servicebus://": run_msgbus,
    }
    results: dict[str, list[Phase]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            queue = "bench-" + uuid.uuid4().hex[:10]  # entities are created by the test broker on first attach
            results[name].append(await runner(args.url, queue, args.messages, args.size, args.batch))
    n = args.messages
    print(f"{n} x {args.size} B messages, batches of {args.batch}, {args.rounds} rounds (median)")
    print(f"{'client':<26} {'send msg/s':>11} {'consume msg/s':>14} {'dups':>5}")
    medians: dict[str, tuple[float, float]] = {}
    for name, phases in results.items():
        send = statistics.median(n / p[0] for p in phases)
        consume = statistics.median(n / p[1] for p in phases)
        medians[name] = (send, consume)
        print(f"{name:<26} {send:>11.0f} {consume:>14.0f} {sum(p[2] for p in phases):>5}")
    raw, ours = medians["raw azure-servicebus aio"], medians["msgbus servicebus://"]
    print(f"{'msgbus / raw':<26} {ours[0] / raw[0]:>11.2f} {ours[1] / raw[1]:>14.2f}")


def main() -> None:
    from integration._servicebus import ServiceBus

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("MSGBUS_TEST_SERVICEBUS_URL") or ServiceBus().url)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
