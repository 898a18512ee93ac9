"""Throughput of the ``sqs://`` adapter at the SPI level vs raw aiobotocore, same endpoint, same run.

Both sides do the same work on 1 KiB messages (``--size``):

* send: ``SendMessageBatch`` of 10 entries, ``--concurrency`` batches in flight (msgbus: ``Adapter.send``
  with ``--batch`` records, which it splits into batches of 10 sent concurrently; raw: the same calls with
  the same body and one string attribute);
* consume: ``ReceiveMessage`` of up to 10 (long poll 1 s), then ``DeleteMessageBatch`` of what came back
  (msgbus: ``Receiver.receive`` + ``ack_many``; raw: ``receive_message`` + ``delete_message_batch``).

Phases run one after the other in one process (send N, then consume N), alternating raw and msgbus for
``--rounds`` rounds; the median of each is printed with the msgbus/raw ratio. Every round checks that N
distinct messages were received (0 lost; duplicates counted). Against moto the endpoint dominates: the
ratio says what msgbus costs on top of the same AWS calls, not what AWS itself would do.

Run: ``python benchmarks/sqs_vs_raw.py [--url sqs://us-east-1?endpoint_url=http://127.0.0.1:4566&...]``.
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

from aiobotocore.session import get_session  # type: ignore[import-untyped]

from msgbus._url import parse_url
from msgbus.adapter import Endpoint, Record
from msgbus_sqs import create

Phase = tuple[float, float, int]  # send seconds, consume seconds, duplicates
LOCAL = "sqs://us-east-1?endpoint_url=http://127.0.0.1:4566&access_key_id=testing&secret_access_key=testing"


async def run_msgbus(url: str, name: str, n: int, size: int, batch: int) -> Phase:
    parsed = parse_url(url)
    reader = parsed.reader({"wait_time": 1, "max_receive_count": 0})
    adapter = create(parsed, reader)
    reader.finish()
    await adapter.open()
    queue = Endpoint("queue", name)
    await adapter.declare(queue)
    body = os.urandom(size // 2).hex().encode()  # text, as the raw side sends
    start = time.perf_counter()
    for i in range(0, n, batch):
        now = time.time()
        await adapter.send(queue, [Record(body, f"m{j}", timestamp=now) for j in range(i, min(i + batch, n))])
    sent = time.perf_counter()
    receiver = await adapter.receiver(queue, prefetch=10)
    seen: set[str] = set()
    received = 0
    while len(seen) < n:
        got = await receiver.receive(10, 1.0)
        if not got:
            raise SystemExit(f"msgbus: only {len(seen)} of {n} received")
        received += len(got)
        seen.update(d.record.id for d in got)
        await receiver.ack_many(got)
    done = time.perf_counter()
    await receiver.close()
    await adapter.close()
    return sent - start, done - sent, received - len(seen)


def client_kwargs(url: str) -> dict[str, Any]:
    o = parse_url(url)
    kw: dict[str, Any] = {"region_name": o.host or "us-east-1"}
    for option, arg in (
        ("endpoint_url", "endpoint_url"),
        ("access_key_id", "aws_access_key_id"),
        ("secret_access_key", "aws_secret_access_key"),
    ):
        if option in o.options:
            kw[arg] = o.options[option]
    return kw


async def run_raw(url: str, name: str, n: int, size: int, batch: int) -> Phase:
    async with get_session().create_client("sqs", **client_kwargs(url)) as sqs:
        queue_url = (await sqs.create_queue(QueueName=name))["QueueUrl"]
        body = os.urandom(size // 2).hex()
        slots = asyncio.Semaphore(8)

        async def send10(ids: range) -> None:
            async with slots:
                entries = [
                    {
                        "Id": str(k),
                        "MessageBody": body,
                        "MessageAttributes": {"id": {"DataType": "String", "StringValue": f"m{j}"}},
                    }
                    for k, j in enumerate(ids)
                ]
                response = await sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
                if response.get("Failed"):
                    raise SystemExit(f"raw: send failed: {response['Failed'][0]}")

        start = time.perf_counter()
        for i in range(0, n, batch):
            top = min(i + batch, n)
            await asyncio.gather(*(send10(range(k, min(k + 10, top))) for k in range(i, top, 10)))
        sent = time.perf_counter()
        seen: set[str] = set()
        received = 0
        while len(seen) < n:
            response = await sqs.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=1,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
            messages = response.get("Messages") or []
            if not messages:
                raise SystemExit(f"raw: only {len(seen)} of {n} received")
            received += len(messages)
            seen.update(m["MessageAttributes"]["id"]["StringValue"] for m in messages)
            await sqs.delete_message_batch(
                QueueUrl=queue_url,
                Entries=[{"Id": str(k), "ReceiptHandle": m["ReceiptHandle"]} for k, m in enumerate(messages)],
            )
        done = time.perf_counter()
        await sqs.delete_queue(QueueUrl=queue_url)
    return sent - start, done - sent, received - len(seen)


async def main_async(args: argparse.Namespace) -> None:
    runners: dict[str, Callable[[str, str, int, int, int], Awaitable[Phase]]] = {
        "raw aiobotocore": run_raw,
        "msgbus sqs://": run_msgbus,
    }
    results: dict[str, list[Phase]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            queue = "bench-" + secrets.token_hex(4)
            results[name].append(await runner(args.url, queue, args.messages, args.size, args.batch))

    n = args.messages
    print(f"{n} x {args.size} B, send batch {args.batch}, median of {args.rounds} rounds, msgs/s")
    print(f"{'':18}{'send':>10}{'consume':>10}{'send+consume':>14}{'dups':>6}")
    medians: dict[str, tuple[float, float, float]] = {}
    for name, phases in results.items():
        send = statistics.median(n / p[0] for p in phases)
        consume = statistics.median(n / p[1] for p in phases)
        both = statistics.median(n / (p[0] + p[1]) for p in phases)
        medians[name] = (send, consume, both)
        print(f"{name:18}{send:>10,.0f}{consume:>10,.0f}{both:>14,.0f}{sum(p[2] for p in phases):>6}")
    raw, ours = medians["raw aiobotocore"], medians["msgbus sqs://"]
    print(f"{'msgbus / raw':18}" + "".join(f"{o / r:>{w}.2f}" for o, r, w in zip(ours, raw, (10, 10, 14), strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("MSGBUS_TEST_SQS_URL", LOCAL))
    parser.add_argument("--messages", type=int, default=2_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
