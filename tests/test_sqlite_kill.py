"""kill -9 of a sqlite:// consumer or producer process loses nothing (promise 2 and promise 1).

The killed process is a real separate process (``sys.executable``) using the public API on the same
database file; the test process checks the queue afterwards with exact counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import msgbus

CHILD = Path(__file__).with_name("sqlite_kill_child.py")
REPO = Path(__file__).resolve().parent.parent


async def spawn(*args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), *args, stdout=asyncio.subprocess.PIPE, env=env
    )


async def read(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
    assert line, f"child exited early with {await proc.wait()}"
    fields: dict[str, Any] = json.loads(line)
    return fields


async def kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
    assert await proc.wait() == -signal.SIGKILL


async def receive_all(bus: msgbus.Bus, want: int) -> list[msgbus.Message[Any]]:
    """Everything left in queue ``work`` (acked), stopping after ``want`` or 1 s with nothing new."""
    got: list[msgbus.Message[Any]] = []
    async with bus.consumer("work", prefetch=100) as consumer:
        while len(got) < want:
            batch = await consumer.receive(max_messages=100, timeout=10.0)
            if not batch:
                break
            got += batch
            for msg in batch:
                await msg.ack()
        extra = await consumer.receive(max_messages=100, timeout=1.0)
        got += extra  # anything here beyond ``want`` is a duplicate the assertions will report
        for msg in extra:
            await msg.ack()
    return got


async def test_killed_consumer_mid_handler_loses_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db?visibility_timeout=1"
    total, acked_by_child = 200, 50
    async with msgbus.connect(url) as bus:
        ids = await bus.producer("work").send_many([{"n": i} for i in range(total)])
        child = await spawn("consume", url, str(acked_by_child))
        try:
            handled: list[str] = []
            while True:
                line = await read(child)
                if "holding" in line:
                    break
                handled.append(line["handled"])
            held_id, held_attempt = line["holding"], line["attempt"]
        finally:
            await kill(child)

        got = await receive_all(bus, total - acked_by_child)

    counts = Counter(m.id for m in got)
    assert (held_attempt, len(handled)) == (1, acked_by_child)
    assert [n for n in counts.values() if n > 1] == []  # 0 duplicates
    assert set(handled).isdisjoint(counts)  # acked before the kill: never delivered again
    assert set(handled) | set(counts) == set(ids)  # 0 lost
    assert len(got) == total - acked_by_child
    redelivered = {m.id: m.attempt for m in got if m.attempt != 1}
    assert redelivered == {held_id: 2}  # the killed handler's message, same id, second attempt
    assert handled == ids[:acked_by_child] and held_id == ids[acked_by_child]  # FIFO in the child too


async def test_killed_producer_loses_no_confirmed_send(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    async with msgbus.connect(url) as bus:
        await bus.producer("work").send("declared")  # queue exists before the child starts
        child = await spawn("produce", url)
        try:
            confirmed = [(await read(child))["sent"] for _ in range(150)]
        finally:
            await kill(child)

        got = await receive_all(bus, 1 + len(confirmed))

    counts = Counter(m.id for m in got)
    assert [n for n in counts.values() if n > 1] == []  # 0 duplicates
    assert set(confirmed) <= set(counts)  # every send that returned is there: 0 lost
    # Sends were sequential, so what the child committed is a gap-free prefix of its stream (it kept
    # sending while we read, so the prefix may be longer than what we read).
    numbers = sorted(m.body["n"] for m in got if m.body != "declared")
    assert numbers == list(range(len(numbers))) and len(numbers) >= len(confirmed)
