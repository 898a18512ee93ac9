"""Dead-letter redrive on the embedded backends: at least once across a crash, subscriptions, limit, filter."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import msgbus
from msgbus import HEADER_DEAD_LETTER_HISTORY, Outgoing
from msgbus.errors import ConfigError

CHILD = Path(__file__).with_name("redrive_crash_child.py")
REPO = Path(__file__).resolve().parent.parent


async def dead_lettered(bus: msgbus.Bus, queue: str, n: int, reason: str = "bad") -> list[str]:
    """``n`` messages sent to ``queue`` and rejected at once (so they are in its dead letters)."""
    ids = await bus.producer(queue).send_many([Outgoing({"i": i}, key=f"k{i}") for i in range(n)])
    consumer = bus.consumer(queue, prefetch=100)
    rejected = 0
    while rejected < n:
        for msg in await consumer.receive(100, timeout=2.0):
            await msg.reject(f"{reason} {msg.body['i']}")
            rejected += 1
    await consumer.close()
    return ids


async def received(bus: msgbus.Bus, consumer: msgbus.Consumer[Any], idle: float = 1.5) -> Counter[str]:
    """Every id ``consumer`` gets until ``idle`` seconds pass without one (acked), with how often."""
    seen: Counter[str] = Counter()
    while batch := await consumer.receive(100, timeout=idle):
        for msg in batch:
            seen[msg.id] += 1
            await msg.ack()
    return seen


async def test_a_crash_between_send_and_removal_loses_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db?visibility_timeout=1"
    async with msgbus.connect(url) as bus:
        sent = await dead_lettered(bus, "orders", 250)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), url, "orders", stdout=asyncio.subprocess.PIPE, env=env
    )
    out, _ = await proc.communicate()
    first = json.loads(out.decode().splitlines()[0])["sent"]
    assert proc.returncode == 0 and len(first) == 100  # died after the first batch went back
    async with msgbus.connect(url) as bus:
        # The crash left the first batch in both places: a second redrive moves all 250 (the 100 again).
        again = await bus.redrive("orders")
        assert sorted(again.moved) == sorted(sent)
        seen = await received(bus, bus.consumer("orders"))
        assert set(seen) == set(sent)  # 0 lost
        duplicates = {i for i, n in seen.items() if n > 1}
        assert duplicates == set(first)  # exactly the batch that went back before the crash, each twice
        assert max(seen.values()) == 2
        print(f"250 dead letters, died after sending 100 back: 250 received, 0 lost, {len(duplicates)} dup")
        assert (await bus.redrive("orders", idle=1.5)).moved == []


async def test_a_subscription_gets_its_own_dead_letters_back_alone() -> None:
    async with msgbus.connect(f"memory://redrive-{uuid.uuid4().hex[:8]}") as bus:
        mine = bus.subscriber("placed", subscription="billing", prefetch=10)
        other = bus.subscriber("placed", subscription="audit")
        await mine.open()
        await other.open()
        sent = await bus.publisher("placed").publish_many([{"i": i} for i in range(10)])
        for msg in await mine.receive(10, timeout=1.0):
            await msg.reject("billing failed")
        assert set(await received(bus, other)) == set(sent)
        moved = await bus.redrive("placed", subscription="billing")
        assert sorted(moved.moved) == sorted(sent)
        back = bus.subscriber("placed", subscription="billing")
        assert set(await received(bus, back)) == set(sent)
        assert not await received(bus, other)  # the redrive reached the topic; audit skipped it


async def test_limit_filter_and_dry_run_leave_the_rest_dead() -> None:
    async with msgbus.connect(f"memory://redrive-{uuid.uuid4().hex[:8]}?visibility_timeout=0.5") as bus:
        sent = await dead_lettered(bus, "q", 30)
        dry = await bus.redrive("q", dry_run=True, idle=0.3)
        assert dry.moved == [] and sorted(dry.left) == sorted(sent)
        evens = await bus.redrive("q", filter=lambda m: m.body["i"] % 2 == 0, idle=0.3)
        assert len(evens.moved) == 15 and len(evens.left) == 15
        some = await bus.redrive("q", limit=4, idle=0.3)
        assert len(some.moved) == 4
        rest = await bus.redrive("q", idle=0.3)
        moved = evens.moved + some.moved + rest.moved
        assert sorted(moved) == sorted(sent) and len(set(moved)) == 30
        msgs = await bus.consumer("q").receive(30, timeout=1.0)
        history = json.loads(msgs[0].headers[HEADER_DEAD_LETTER_HISTORY])
        assert history[0]["reason"].startswith("bad ") and history[0]["source"] == "queue:q"


async def test_a_second_death_adds_to_the_history() -> None:
    async with msgbus.connect(f"memory://redrive-{uuid.uuid4().hex[:8]}") as bus:
        (sent,) = await dead_lettered(bus, "q", 1, reason="first")
        await bus.redrive("q", idle=0.2)
        (msg,) = await bus.consumer("q").receive(1, timeout=1.0)
        await msg.reject("second")
        await bus.redrive("q", idle=0.2)
        (msg,) = await bus.consumer("q").receive(1, timeout=1.0)
        reasons = [e["reason"] for e in json.loads(msg.headers[HEADER_DEAD_LETTER_HISTORY])]
        assert msg.id == sent and msg.attempt == 1 and reasons == ["first 0", "second"]


@pytest.mark.parametrize(
    "kwargs",
    [{"limit": 0}, {"limit": True}, {"limit": "5"}, {"filter": "all"}, {"idle": -1}, {"idle": float("nan")}],
)
async def test_bad_arguments_raise_config_error(kwargs: dict[str, Any]) -> None:
    async with msgbus.connect("memory://") as bus:
        with pytest.raises(ConfigError):
            await bus.redrive("q", **kwargs)
        with pytest.raises(ConfigError):
            await bus.redrive("bad name")
