"""A process for tests/test_sqlite_kill.py to SIGKILL: a consumer stuck mid-handler, or a producer mid-stream.

``python sqlite_kill_child.py consume URL N``: handle and ack N messages of queue ``work`` printing
``{"handled": id}`` for each, then print ``{"holding": id, "attempt": n}`` and hang inside the handler.
``python sqlite_kill_child.py produce URL``: send messages one at a time forever, printing ``{"sent": id}``
after each ``send`` returns (that is, once it is durable).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys

import msgbus


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def consume(url: str, n: int) -> None:
    handled = 0

    async def handle(msg: msgbus.Message[object]) -> None:
        nonlocal handled
        if handled < n:
            handled += 1
            # Acked (durably: ack() returns once the store has it) before it says so. Left to the runtime, the
            # ack is batched and may still be on its way when the next message is taken (room is freed at
            # settlement): under CPU load the last one came back after the kill, which the promise allows
            # ("re-delivers at most that much", docs/guide.md) and this test's exact counts did not.
            await msg.ack()
            say(handled=msg.id, attempt=msg.attempt)
            return
        say(holding=msg.id, attempt=msg.attempt)
        await asyncio.Event().wait()  # "mid-handler" until SIGKILL

    async with msgbus.connect(url) as bus, bus.consumer("work", prefetch=1) as consumer:
        await consumer.run(handle, concurrency=1)


async def produce(url: str) -> None:
    async with msgbus.connect(url) as bus:
        producer = bus.producer("work")
        for i in itertools.count():
            msg_id = await producer.send({"n": i})
            say(sent=msg_id)


if __name__ == "__main__":
    mode, url = sys.argv[1], sys.argv[2]
    asyncio.run(consume(url, int(sys.argv[3])) if mode == "consume" else produce(url))
