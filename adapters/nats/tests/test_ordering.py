"""ordering=per_key against a real nats-server when a consumer process is killed in the middle of its partitions.

The contract's ordering check runs two consumers in one process and kills none; here a worker process handles a
key's first messages, is SIGKILLed while it holds one message of several partitions, and a survivor finishes: every
key's messages are handled in send order across both, none twice at once, none lost.
"""

from __future__ import annotations

import asyncio
import os
import sys
import zlib
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import msgbus
from msgbus import Outgoing
from msgbus.adapter import Endpoint, Record
from msgbus.errors import TopologyError
from msgbus_nats import NatsAdapter

MakeAdapter = Callable[..., Awaitable[NatsAdapter]]

KEYS, PER_KEY, DONE_BEFORE_HOLDING = 8, 25, 40

_WORKER = """
import asyncio, sys
import msgbus

async def main():
    done = 0
    async def handle(msg):
        nonlocal done
        k, i = msg.body["k"], msg.body["i"]
        if done >= int(sys.argv[1]):
            print("held", k, i, flush=True)
            await asyncio.sleep(3600)  # holds its partition until the process is killed
        done += 1
        print("done", k, i, flush=True)
    async with msgbus.connect() as bus:
        await bus.consumer(sys.argv[2]).run(handle, concurrency=8)

asyncio.run(main())
"""


async def test_a_consumer_killed_mid_partition_keeps_order_and_loses_nothing(nats_url: str, prefix: str) -> None:
    url = f"{nats_url}?prefix={prefix}&ordering=per_key&ack_wait=1"
    queue = "orders"
    async with msgbus.connect(url) as bus:
        items = [Outgoing({"k": f"key-{k}", "i": i}, key=f"key-{k}") for i in range(PER_KEY) for k in range(KEYS)]
        await bus.producer(queue).send_many(items)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WORKER,
            str(DONE_BEFORE_HOLDING),
            queue,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "MSGBUS_URL": url},
        )
        assert proc.stdout is not None
        worker: dict[str, list[int]] = defaultdict(list)
        held: set[tuple[str, int]] = set()
        try:
            async with asyncio.timeout(30):
                while len(held) < 3:  # three partitions (at least) each with a message in the dying process
                    line = (await proc.stdout.readline()).decode().split()
                    assert line, "the worker process ended early"
                    if line[0] == "done":
                        worker[line[1]].append(int(line[2]))
                    else:
                        held.add((line[1], int(line[2])))
        finally:
            proc.kill()  # SIGKILL: nothing settled, nothing given back
            await proc.wait()
        # What it printed before the kill (handled, maybe not acked yet). A line that is not "what key i" (one run
        # in 21 here met one; its text was not kept) is set aside and shown if a check below fails.
        cut: list[str] = []
        for raw in (await proc.stdout.read()).decode().splitlines():
            if len(parts := raw.split()) != 3:
                cut.append(raw)
                continue
            what, k, i = parts
            (worker[k].append(int(i)) if what == "done" else held.add((k, int(i))))

        survivor: dict[str, list[int]] = defaultdict(list)
        attempts: dict[tuple[str, int], int] = {}
        busy: set[str] = set()
        overlaps: list[str] = []
        finished = asyncio.Event()

        async def handle(msg: msgbus.Message[Any]) -> None:
            k, i = msg.body["k"], msg.body["i"]
            if k in busy:
                overlaps.append(f"{k}#{i}")
            busy.add(k)
            await asyncio.sleep(0.002)
            busy.discard(k)
            survivor[k].append(i)
            attempts[(k, i)] = msg.attempt
            if sum(len(v) and v[-1] == PER_KEY - 1 for v in survivor.values()) == KEYS:
                finished.set()

        consumer = bus.consumer(queue)
        task = asyncio.create_task(consumer.run(handle, concurrency=8))
        try:
            async with asyncio.timeout(30):
                await finished.wait()
        finally:
            consumer.stop()
            await task
    assert not overlaps, f"a key in two handlers at once: {overlaps[:5]}"
    assert sum(map(len, worker.values())) >= DONE_BEFORE_HOLDING
    for k in (f"key-{k}" for k in range(KEYS)):
        before, after = worker.get(k, []), survivor[k]
        assert before == list(range(len(before))), f"{k} out of order in the killed worker: {before}"
        # The survivor takes up where the worker stopped: its last handled message again (its ack may not have
        # left before the kill) or the next; then the rest in order, none missing.
        start = after[0]
        assert start in (len(before) - 1, len(before)) and start >= 0, f"{k}: worker {before}, survivor {after} {cut}"
        assert after == list(range(start, PER_KEY)), f"{k} out of order or lost after the kill: {after}"
    for k, i in held:
        assert attempts[(k, i)] >= 2, f"{k}#{i} held by the killed process came back with attempt {attempts[(k, i)]}"


async def test_a_partition_message_that_waited_out_its_ack_wait_here_is_not_handed_out(
    make_adapter: MakeAdapter,
) -> None:
    """The core had no room for it until its ack wait ran out: another consumer got its partition's head since."""
    a = await make_adapter(ordering="per_key", partitions="2", ack_wait="1")
    b = await make_adapter(ordering="per_key", partitions="2", ack_wait="1")
    queue = Endpoint("queue", "orders")
    await a.declare(queue)
    keys = {zlib.crc32(k.encode()) % 2: k for k in ("a", "b", "c", "d")}  # one key per partition
    await a.send(queue, [Record(body=f"{k}{i}".encode(), id=f"{k}{i}", key=k) for k in keys.values() for i in (0, 1)])
    first = await a.receiver(queue, prefetch=1)
    taken = await first.receive(1, 5.0)  # one partition's head; the other's arrives and waits in the receiver
    async with asyncio.timeout(5):
        while not first._ready:
            await asyncio.sleep(0.01)
    waiting = first._ready[0][1]
    await asyncio.sleep(1.5)  # its ack wait runs out while it waits: the server takes it back
    other = await b.receiver(queue, prefetch=10)
    got: list[str] = []
    async with asyncio.timeout(10):
        while len(got) < 2:  # the waiting one's partition, both messages in order, at the other consumer
            batch = [d for d in await other.receive(10, 1.0) if d.record.key != taken[0].record.key]
            await other.ack_many(batch)
            got += [d.record.id for d in batch]
    assert [g[1] for g in got] == ["0", "1"] and got[0].encode() == waiting.data
    late = await first.receive(10, 0.5)
    assert all(d.record.id != got[0] for d in late), "the stale copy of a handled partition head was handed out"
    await first.ack_many(taken)


async def test_a_keyed_topic_keeps_each_subscriptions_order(nats_url: str, prefix: str) -> None:
    """Publishes go to the topic's partition subjects; each subscription (two consumers each) gets every message,
    a key's in publish order and one at a time. A bus without the option cannot take the topic over (documented)."""
    url = f"{nats_url}?prefix={prefix}&ordering=per_key&ack_wait=2"
    keys, per_key = 6, 20
    async with msgbus.connect(url) as bus, msgbus.connect(f"{nats_url}?prefix={prefix}") as plain:
        subs = [bus.subscriber("events", subscription=s) for s in ("a", "b") for _ in range(2)]
        for sub in subs:
            await sub.open()
        with pytest.raises(TopologyError, match="other subjects"):
            await plain.subscriber("events", subscription="all").open()
        items = [Outgoing({"k": f"k{k}", "i": i}, key=f"k{k}") for i in range(per_key) for k in range(keys)]
        await bus.publisher("events").publish_many(items)
        seen: dict[str, dict[str, list[int]]] = {"a": defaultdict(list), "b": defaultdict(list)}
        busy: set[tuple[str, str]] = set()
        overlaps: list[str] = []

        def handler(name: str) -> Callable[[msgbus.Message[Any]], Awaitable[None]]:
            async def handle(msg: msgbus.Message[Any]) -> None:
                k = msg.body["k"]
                if (name, k) in busy:
                    overlaps.append(f"{name}:{k}#{msg.body['i']}")
                busy.add((name, k))
                await asyncio.sleep(0.001)
                busy.discard((name, k))
                seen[name][k].append(msg.body["i"])

            return handle

        names = ["a", "a", "b", "b"]
        tasks = [asyncio.create_task(s.run(handler(n), concurrency=4)) for s, n in zip(subs, names, strict=True)]
        try:
            async with asyncio.timeout(30):
                while any(sum(map(len, seen[n].values())) < keys * per_key for n in seen):
                    await asyncio.sleep(0.05)
        finally:
            for sub in subs:
                sub.stop()
            await asyncio.gather(*tasks)
    assert not overlaps, overlaps[:5]
    for name in seen:
        assert all(seen[name][f"k{k}"] == list(range(per_key)) for k in range(keys)), (name, dict(seen[name]))
