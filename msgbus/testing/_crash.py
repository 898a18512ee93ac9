"""Crash a consumer that holds unacked messages: SIGKILL a real process, or abandon one in-process."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import msgbus

from ._context import ContractContext, ensure, fail
from .worker import ACKED, READY, SEND_STYLES, is_gap

__all__ = ["crash_consumer", "crash_sender", "crash_with_gaps", "start_worker", "worker_error"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(msgbus.__file__)))  # so the worker imports this msgbus


async def crash_consumer(ctx: ContractContext, queue: str, n: int) -> tuple[list[str], str]:
    """Let a consumer take ``n`` messages of ``queue`` and die without settling them.

    With ``capabilities.cross_process`` a worker process is SIGKILLed; otherwise (``memory://``) an in-process
    consumer is abandoned (its receiver closed without settling). Returns the held ids and how it died.
    """
    held, _acked, how = await _crash(ctx, queue, n, gaps=False)
    return held, how


async def crash_with_gaps(ctx: ContractContext, queue: str, n: int) -> tuple[list[str], list[str], str]:
    """Like ``crash_consumer``, but the consumer acks two of every three held messages (``worker.is_gap``) and
    gives the acks ``worker.ACK_GRACE`` seconds before it dies. Returns the held ids, the acked ids, how it died.
    """
    return await _crash(ctx, queue, n, gaps=True)


async def crash_sender(ctx: ContractContext, queue: str, n: int) -> tuple[list[str], str]:
    """Send ``n`` messages to ``queue`` from three processes at once (one at a time, concurrently, one batch),
    each exiting hard the moment its last send returned, so nothing after it can flush what it left behind
    (in-process on ``memory://``: buses dropped without closing). Returns the ids whose sends returned."""
    part = n // len(SEND_STYLES)
    if ctx.caps.cross_process:
        sent = await asyncio.gather(*(_kill_worker(ctx, queue, part, f"send {s}") for s in SEND_STYLES))
        return [i for ids, _ in sent for i in ids], "sender processes exited hard"
    producer = (await ctx.open_bus()).producer(queue)
    ids = [await producer.send({"i": i}) for i in range(part)]
    ids += await asyncio.gather(*(producer.send({"i": i}) for i in range(part)))
    return ids + await producer.send_many([{"i": i} for i in range(part)]), "sender bus never closed"


async def abandon(consumer: msgbus.Consumer[Any]) -> None:
    """Drop ``consumer``'s receiver without settling anything, as if its process died (in-process crashes)."""
    inbox = consumer._inbox
    inbox.closed = True
    inbox.buffer.clear()
    if inbox.receiver is not None:
        await inbox.receiver.close()
    consumer._bus._consumers.discard(consumer)


async def _crash(ctx: ContractContext, queue: str, n: int, *, gaps: bool) -> tuple[list[str], list[str], str]:
    if ctx.caps.cross_process:
        held, acked = await _kill_worker(ctx, queue, n, "gaps" if gaps else None)
        return held, acked, "SIGKILLed consumer process"
    consumer = (await ctx.open_bus()).consumer(queue, prefetch=n)
    messages: list[msgbus.Message[Any]] = []
    ctx.waiting = f"the doomed consumer to take {n} messages"
    while len(messages) < n:
        messages += await consumer.receive(max_messages=n - len(messages), timeout=1.0)
    to_ack = [m for i, m in enumerate(messages) if gaps and not is_gap(i)]
    for msg in to_ack:
        await msg.ack()
    await abandon(consumer)
    return [m.id for m in messages], [m.id for m in to_ack], "abandoned in-process consumer"


async def start_worker(ctx: ContractContext, queue: str, *args: str) -> asyncio.subprocess.Process:
    """Start ``python -m msgbus.testing.worker - QUEUE ARGS...`` on the URL under test (killed at cleanup)."""
    env = dict(os.environ)
    env["MSGBUS_URL"] = ctx.url  # not in argv: the process list is world-readable
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "msgbus.testing.worker",
        "-",
        queue,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )

    async def reap() -> None:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()

    ctx.on_cleanup(reap)
    return proc


async def worker_error(proc: asyncio.subprocess.Process) -> str:
    """How a worker process ended: its exit code and the end of what it wrote to stderr."""
    await proc.wait()
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode(errors="replace").strip()
    return f"exited with {proc.returncode}: {err[-1500:]}"


async def _kill_worker(ctx: ContractContext, queue: str, n: int, mode: str | None) -> tuple[list[str], list[str]]:
    proc = await start_worker(ctx, queue, str(n), *(mode.split() if mode else []))
    assert proc.stdout is not None
    ids: list[str] = []
    acked: list[str] = []
    ctx.waiting = f"the worker process (pid {proc.pid}) to {mode or 'take'} {n} messages"
    while True:
        line = (await proc.stdout.readline()).decode().strip()
        if line == READY:
            break
        if not line and proc.stdout.at_eof():
            fail(f"the worker process {await worker_error(proc)} before it was done with {n} messages")
        if line.startswith(ACKED):
            acked.append(line[len(ACKED) :])
            ids.append(acked[-1])
        elif line:
            ids.append(line)
    if proc.returncode is None:
        try:
            proc.kill()  # SIGKILL: no cleanup, no nack, no goodbye to the broker
        except ProcessLookupError:
            pass  # a sender exits by itself
    await proc.wait()
    ensure(len(ids) == n, f"the worker reported {len(ids)} held messages, expected {n}")
    return ids, acked
