"""Processes for the checks that kill a consumer or a sender: hold messages, die on a poison one, die
mid-stream, or die the moment sends returned.

``python -m msgbus.testing.worker URL QUEUE N [gaps]`` connects, receives N messages from QUEUE without acking,
prints their ids one per line, then ``HOLDING``, and sleeps until killed. With ``gaps`` it first acks two of
every three (printing ``acked ID`` for each) and gives the acks ``ACK_GRACE`` seconds to reach the backend.

``python -m msgbus.testing.worker URL QUEUE N send STYLE`` sends N messages instead (``one-by-one``,
``concurrent`` or in one ``batch``), prints each id once its send returned, then ``HOLDING``, and exits at once:
no close, no flush.

``python -m msgbus.testing.worker URL QUEUE poison MAX_ATTEMPTS`` runs ``consumer.run`` with defaults and
``RetryPolicy(max_attempts=MAX_ATTEMPTS)``; it prints ``HANDLED <id> <attempt>`` for each message it handles
and exits at once with ``os._exit`` (no cleanup, as a segfault or an OOM kill ends a process) when it handles
a message with header ``contract-poison: 1``.

``python -m msgbus.testing.worker URL QUEUE acks K SPIN PREFETCH`` runs ``consumer.run`` with a handler that
never awaits (it spins the CPU for SPIN seconds), prints ``HANDLED <id>`` for each of K messages, and exits
with ``os._exit`` inside the handler of message K+1.

``URL`` may be ``-`` to read it from ``MSGBUS_URL`` (the suite does this, so a password never shows in the
process list).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

import msgbus

READY = "HOLDING"
ACKED = "acked "
# Longer than any adapter's documented ack flush (Kafka writes settled offsets every commit_interval, 0.2 s).
ACK_GRACE = 1.0
HANDLED = "HANDLED"
POISON_HEADER = "contract-poison"
EXIT_CODE = 75  # how a worker that killed itself on purpose exits


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
        ids = [await producer.send({"i": i}) for i in range(n)]
    elif style == "concurrent":
        ids = list(await asyncio.gather(*(producer.send({"i": i}) for i in range(n))))
    else:
        ids = await producer.send_many([{"i": i} for i in range(n)])
    # One write, then gone: an id printed (and flushed) at a time gave a send that returned early the
    # milliseconds it needed to finish in the background (a mutant sqlite send survived the check under load).
    out = memoryview("".join(f"{i}\n" for i in [*ids, READY]).encode())
    while out:
        out = out[os.write(sys.stdout.fileno(), out) :]
    os._exit(0)  # as if killed the moment the sends returned: nothing closed, nothing flushed


async def poison(url: str, queue: str, max_attempts: int) -> None:
    async def handle(msg: msgbus.Message[Any]) -> None:
        print(f"{HANDLED} {msg.id} {msg.attempt}", flush=True)
        if msg.headers.get(POISON_HEADER) == "1":
            os._exit(EXIT_CODE)

    async with msgbus.connect(url) as bus:
        await bus.consumer(queue).run(handle, retry=msgbus.RetryPolicy(max_attempts=max_attempts))


async def acks(url: str, queue: str, k: int, spin: float, prefetch: int) -> None:
    handled = 0

    async def handle(msg: msgbus.Message[Any]) -> None:
        nonlocal handled
        if handled == k:
            os._exit(EXIT_CODE)
        end = time.monotonic() + spin
        while time.monotonic() < end:  # CPU-bound: no await, so nothing else on the loop runs meanwhile
            pass
        handled += 1
        print(f"{HANDLED} {msg.id}", flush=True)

    async with msgbus.connect(url) as bus:
        await bus.consumer(queue, prefetch=prefetch).run(handle)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    usage = (
        "usage: python -m msgbus.testing.worker URL|- QUEUE "
        f"(N [gaps|send {'|'.join(SEND_STYLES)}] | poison MAX_ATTEMPTS | acks K SPIN PREFETCH)"
    )
    url = os.environ.get("MSGBUS_URL", "") if args[:1] == ["-"] else args[0] if args else ""
    queue, mode, rest = (args[1], args[2], args[3:]) if len(args) >= 3 else ("", "", [])
    try:
        if mode == "poison" and len(rest) == 1:
            job = poison(url, queue, int(rest[0]))
        elif mode == "acks" and len(rest) == 3:
            job = acks(url, queue, int(rest[0]), float(rest[1]), int(rest[2]))
        elif mode.isdigit() and rest[:1] == ["send"] and len(rest) == 2 and rest[1] in SEND_STYLES:
            job = send_and_die(url, queue, int(mode), rest[1])
        elif mode.isdigit() and rest in ([], ["gaps"]):
            job = hold(url, queue, int(mode), gaps=rest == ["gaps"])
        else:
            raise ValueError(mode)
    except ValueError:
        print(usage, file=sys.stderr)
        return 2
    # A shell's background job starts with SIGINT ignored, and Python then leaves it so: the checks stop the
    # last worker gracefully with SIGINT, which must not be lost.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    asyncio.run(job)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
