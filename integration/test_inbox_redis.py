"""The Redis inbox against a real redis-server: copies of one id apply once, a failed handler's commands and id
are both discarded, and an inbox that marks the id apart from the handler's commands is caught losing effects."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio

import msgbus
from integration.brokers import endpoint
from msgbus import Handler, Message
from msgbus.inbox import RedisInbox


@pytest.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    r = redis.asyncio.Redis.from_url(endpoint("redis").url)
    yield r
    await r.aclose()


async def _run(
    inbox: RedisInbox, client: redis.asyncio.Redis, run: str, failing: set[str], seconds: float = 30
) -> dict[str, int]:
    """20 ids sent 3 times each; the handler counts each in Redis through the inbox; some fail once after counting."""

    async def count(msg: Message[Any]) -> None:
        inbox.connection().incr(f"{run}:effects:{msg.id}")
        await asyncio.sleep(0.02)  # copies of this id are in other handlers meanwhile
        if msg.id in failing:
            failing.discard(msg.id)
            raise RuntimeError("fails after queueing its write: the write must not land")

    handler: Handler = count
    async with msgbus.connect("memory://") as bus:
        for i in range(20):
            for _ in range(3):
                await bus.producer("orders").send(i, message_id=f"{run}-{i}")
        consumer = bus.consumer("orders", retry=msgbus.RetryPolicy(initial_backoff=0.01, jitter=0))
        task = asyncio.create_task(consumer.run(handler, concurrency=8, middleware=[inbox]))
        try:
            # A deadline, not asyncio.timeout: redis-py's calls lose a cancel on Python 3.11 (the adapter restores
            # it, see msgbus/_translate.py; this raw client does not), and the loop then ran forever.
            deadline = asyncio.get_running_loop().time() + seconds
            while len([k async for k in client.scan_iter(match=f"{run}:effects:*")]) < 20:
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"fewer than 20 effects after {seconds}s")
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
        finally:
            consumer.stop()
            await task
    return {k.decode(): int(await client.get(k)) async for k in client.scan_iter(match=f"{run}:effects:*")}


async def test_copies_apply_once_and_a_failed_handler_leaves_nothing(client: redis.asyncio.Redis) -> None:
    run = uuid.uuid4().hex[:8]
    inbox = RedisInbox(client, name=run, retention=60)
    effects = await _run(inbox, client, run, {f"{run}-{i}" for i in range(0, 20, 4)})
    assert effects == {f"{run}:effects:{run}-{i}": 1 for i in range(20)}  # 60 copies, 20 effects, 0 twice
    assert inbox.duplicates == 40
    ttl = await client.pttl(f"msgbus-inbox:{run}:{run}-0")
    assert 0 < ttl <= 60_000  # ids expire after the retention


class _MarkFirst(RedisInbox):
    """Mutation: marks the id on its own before running the handler, outside the handler's transaction."""

    async def _once(self, message_id: str, handler: Handler, msg: Message[Any]) -> bool:
        key = f"msgbus-inbox:{self.name}:{message_id}"
        if not await self._client.set(key, b"1", nx=True, px=int(self.retention * 1000)):
            return False
        async with self._client.pipeline(transaction=True) as pipe:
            token = self._current.set(pipe)
            try:
                await handler(msg)
            finally:
                self._current.reset(token)
            await pipe.execute()
        return True


async def test_the_test_catches_an_inbox_that_marks_ids_apart_from_the_handler(client: redis.asyncio.Redis) -> None:
    run = uuid.uuid4().hex[:8]
    with pytest.raises(TimeoutError):  # the failed ones never apply: their retries find the id already marked
        failing = {f"{run}-{i}" for i in range(0, 20, 4)}
        await _run(_MarkFirst(client, name=run, retention=60), client, run, failing, seconds=5)
