"""A consumer process that takes messages and never settles them, for the consumer-crash check.

``python -m msgbus.testing.worker URL QUEUE N`` connects, receives N messages from QUEUE without acking,
prints their ids one per line, then ``HOLDING``, and sleeps until killed. ``URL`` may be ``-`` to read it
from ``MSGBUS_URL`` (the suite does this, so a password never shows in the process list).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import msgbus

READY = "HOLDING"


async def hold(url: str, queue: str, n: int) -> None:
    bus = msgbus.connect(url)
    await bus.open()
    consumer = bus.consumer(queue, prefetch=n)
    held: list[msgbus.Message[Any]] = []
    while len(held) < n:
        held += await consumer.receive(max_messages=n - len(held), timeout=1.0)
    for msg in held:
        print(msg.id, flush=True)
    print(READY, flush=True)
    await asyncio.sleep(3600)  # killed long before this


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or not args[2].isdigit():
        print("usage: python -m msgbus.testing.worker URL|- QUEUE N", file=sys.stderr)
        return 2
    url = os.environ.get("MSGBUS_URL", "") if args[0] == "-" else args[0]
    asyncio.run(hold(url, args[1], int(args[2])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
