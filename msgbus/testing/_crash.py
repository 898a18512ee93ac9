"""Crash a consumer that holds unacked messages: SIGKILL a real process, or abandon one in-process."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import msgbus

from ._context import ContractContext, ensure, fail
from .worker import READY

__all__ = ["crash_consumer", "start_worker", "worker_error"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(msgbus.__file__)))  # so the worker imports this msgbus


async def crash_consumer(ctx: ContractContext, queue: str, n: int) -> tuple[list[str], str]:
    """Let a consumer take ``n`` messages of ``queue`` and die without settling them.

    With ``capabilities.cross_process`` a worker process is SIGKILLed; otherwise (``memory://``) an in-process
    consumer is abandoned (its receiver closed without settling). Returns the held ids and how it died.
    """
    if ctx.caps.cross_process:
        return await _kill_worker(ctx, queue, n), "SIGKILLed consumer process"
    consumer = (await ctx.open_bus()).consumer(queue, prefetch=n)
    held: list[msgbus.Message[Any]] = []
    ctx.waiting = f"the doomed consumer to take {n} messages"
    while len(held) < n:
        held += await consumer.receive(max_messages=n - len(held), timeout=1.0)
    await consumer._abandon()
    return [m.id for m in held], "abandoned in-process consumer"


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


async def _kill_worker(ctx: ContractContext, queue: str, n: int) -> list[str]:
    proc = await start_worker(ctx, queue, str(n))
    assert proc.stdout is not None
    ids: list[str] = []
    ctx.waiting = f"the worker process (pid {proc.pid}) to take {n} messages"
    while True:
        line = (await proc.stdout.readline()).decode().strip()
        if line == READY:
            break
        if not line and proc.stdout.at_eof():
            fail(f"the worker process {await worker_error(proc)} before holding {n} messages")
        if line:
            ids.append(line)
    proc.kill()  # SIGKILL: no cleanup, no nack, no goodbye to the broker
    await proc.wait()
    ensure(len(ids) == n, f"the worker reported {len(ids)} held messages, expected {n}")
    return ids
