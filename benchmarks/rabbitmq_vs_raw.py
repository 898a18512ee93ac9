"""Send+consume throughput of the RabbitMQ adapter (SPI level) vs raw aio-pika doing the same work.

Both sides, on the same broker in the same run, with the same work per message: a persistent 1 KiB message
with a message id, published in pipelined batches of ``--batch`` with publisher confirms (each batch waits
for its confirms), consumed concurrently on another channel with ``basic.qos(--prefetch)`` and one manual
ack per message. Same queue type (``--queue-type``, quorum by default). Rounds alternate msgbus/raw to
spread broker noise; the median of each side and their ratio are printed (and ``--json`` written).

Run: ``python benchmarks/rabbitmq_vs_raw.py [--url amqp://guest:guest@127.0.0.1:5672/] [--messages 10000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika

from msgbus._url import parse_url
from msgbus.adapter import Endpoint, Record
from msgbus_rabbitmq import create


async def run_msgbus(url: str, queue: str, messages: int, size: int, batch: int, prefetch: int, qtype: str) -> float:
    """Seconds from the first send to the last ack, through the adapter SPI."""
    parsed = parse_url(url)
    reader = parsed.reader({"queue_type": qtype})
    adapter = create(parsed, reader)
    reader.finish()
    await adapter.open()
    endpoint = Endpoint("queue", queue)
    await adapter.declare(endpoint)
    receiver = await adapter.receiver(endpoint, prefetch)
    body = os.urandom(size)

    async def produce() -> None:
        for start in range(0, messages, batch):
            ids = range(start, min(start + batch, messages))
            await adapter.send(endpoint, [Record(body, f"m{i}") for i in ids])

    async def consume() -> None:
        done = 0
        while done < messages:
            deliveries = await receiver.receive(prefetch, 10.0)
            if not deliveries:
                raise RuntimeError(f"msgbus: stalled after {done} of {messages}")
            await receiver.ack_many(deliveries)
            done += len(deliveries)

    began = time.perf_counter()
    await asyncio.gather(produce(), consume())
    elapsed = time.perf_counter() - began
    await receiver.close()
    await adapter.close()
    return elapsed


async def run_raw(url: str, queue: str, messages: int, size: int, batch: int, prefetch: int, qtype: str) -> float:
    """The same work written directly against aio-pika."""
    connection = await aio_pika.connect_robust(url)
    publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    consume_channel = await connection.channel()
    await consume_channel.set_qos(prefetch_count=prefetch)
    arguments = {"x-queue-type": "quorum"} if qtype == "quorum" else {}
    q = await consume_channel.declare_queue(queue, durable=True, arguments=arguments)
    body = os.urandom(size)
    done = asyncio.get_running_loop().create_future()
    count = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal count
        await message.ack()
        count += 1
        if count == messages and not done.done():
            done.set_result(None)

    async def produce() -> None:
        exchange = publish_channel.default_exchange
        for start in range(0, messages, batch):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(body, message_id=f"m{i}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=queue,
                        mandatory=True,
                    )
                    for i in range(start, min(start + batch, messages))
                )
            )

    began = time.perf_counter()
    tag = await q.consume(on_message)
    await asyncio.gather(produce(), asyncio.wait_for(done, 120))
    elapsed = time.perf_counter() - began
    await q.cancel(tag)
    await connection.close()
    return elapsed


async def _delete(url: str, *queues: str) -> None:
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    for name in queues:
        await channel.queue_delete(name)
    await connection.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", default=os.environ.get("MSGBUS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args()


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Alternate msgbus/raw rounds; the median rate of each side and their ratio."""
    shape = (args.messages, args.size, args.batch, args.prefetch, args.queue_type)
    rates: dict[str, list[float]] = {"msgbus": [], "raw": []}
    for _ in range(args.rounds):
        for side, runner in (("msgbus", run_msgbus), ("raw", run_raw)):
            queue = f"bench-{side}-{uuid.uuid4().hex[:8]}"
            try:
                seconds = await runner(args.url, queue, *shape)
            finally:
                await _delete(args.url, queue, f"{queue}.dlq")
            rates[side].append(args.messages / seconds)
    result: dict[str, Any] = {
        "messages": args.messages,
        "size": args.size,
        "batch": args.batch,
        "prefetch": args.prefetch,
        "queue_type": args.queue_type,
        "rounds": args.rounds,
        "msgbus_msgs_per_s": round(statistics.median(rates["msgbus"])),
        "raw_msgs_per_s": round(statistics.median(rates["raw"])),
        "all": {k: [round(v) for v in vs] for k, vs in rates.items()},
    }
    result["ratio"] = round(result["msgbus_msgs_per_s"] / result["raw_msgs_per_s"], 3)
    return result


if __name__ == "__main__":
    arguments = parse_args()
    figures = json.dumps(asyncio.run(measure(arguments)), indent=2)
    print(figures)
    if arguments.json:
        Path(arguments.json).write_text(figures)
