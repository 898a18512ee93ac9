"""A consumer process that takes messages and never settles them, for the consumer-crash checks.

``python -m msgbus.testing.worker URL QUEUE N [gaps|send STYLE]`` connects, receives N messages from QUEUE without
acking, prints their ids one per line, then ``HOLDING``, and sleeps until killed. With ``gaps`` it first acks
two of every three (printing ``acked ID`` for each) and gives the acks ``ACK_GRACE`` seconds to reach the
backend. With ``send STYLE`` it sends N messages instead (``one-by-one``, ``concurrent`` or in one ``batch``),
prints each id once its send returned, then ``HOLDING``, and exits at once: no close, no flush.
``URL`` may be ``-`` to read it from ``MSGBUS_URL`` (the suite does this, so a password never shows in the
process list).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import msgbus

READY = "HOLDING"
ACKED = "acked "
# Longer than any adapter's documented ack flush (Kafka writes settled offsets every commit_interval, 0.2 s).
ACK_GRACE = 1.0


def is_gap(i: int) -> bool:
    """Which held messages a ``gaps`` worker leaves unacked: every third, so there are gaps around the acks."""
    return i % 3 == 0


async def hold(url: str, queue: str, n: int, gaps: bool = False) -> None:
    bus = msgbus.connect(url)
    await bus.open()
    consumer = bus.consumer(queue, prefetch=n)
    held: list[msgbus.Message[Any]] = []
    while len(held) < n:
        held += await consumer.receive(max_messages=n - len(held), timeout=1.0)
    for i, msg in enumerate(held):
        if gaps and not is_gap(i):
            await msg.ack()
            print(ACKED + msg.id, flush=True)
        else:
            print(msg.id, flush=True)
    if gaps:
        await asyncio.sleep(ACK_GRACE)
    print(READY, flush=True)
    await asyncio.sleep(3600)  # killed long before this


SEND_STYLES = ("one-by-one", "concurrent", "batch")


async def send_and_die(url: str, queue: str, n: int, style: str) -> None:
    bus = msgbus.connect(url)
    await bus.open()
    producer = bus.producer(queue)
    if style == "one-by-one":
        for i in range(n):
            print(await producer.send({"i": i}), flush=True)
    elif style == "concurrent":
        for msg_id in await asyncio.gather(*(producer.send({"i": i}) for i in range(n))):
            print(msg_id, flush=True)
    else:
        for msg_id in await producer.send_many([{"i": i} for i in range(n)]):
            print(msg_id, flush=True)
    print(READY, flush=True)
    os._exit(0)  # as if killed the moment the sends returned: nothing closed, nothing flushed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    modes = [[], ["gaps"], *(["send", style] for style in SEND_STYLES)]
    if len(args) not in (3, 4, 5) or not args[2].isdigit() or args[3:] not in modes:
        print(
            f"usage: python -m msgbus.testing.worker URL|- QUEUE N [gaps|send {'|'.join(SEND_STYLES)}]", file=sys.stderr
        )
        return 2
    url = os.environ.get("MSGBUS_URL", "") if args[0] == "-" else args[0]
    if args[3:4] == ["send"]:
        asyncio.run(send_and_die(url, args[1], int(args[2]), args[4]))
    else:
        asyncio.run(hold(url, args[1], int(args[2]), gaps=args[3:] == ["gaps"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
