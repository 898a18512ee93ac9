"""Fixtures for the Redis adapter tests: a real Redis (never a mocked client) and isolated key prefixes."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import redis.asyncio

from msgbus._url import parse_url
from msgbus_redis import RedisAdapter, create

MakeAdapter = Callable[..., Awaitable[RedisAdapter]]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``MSGBUS_TEST_REDIS_URL``, else the integration suite's local redis-server (skipped when absent)."""
    env = os.environ.get("MSGBUS_TEST_REDIS_URL")
    if env:
        yield env
        return
    from integration import brokers

    yield brokers.endpoint("redis").url
    brokers.release()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain redis-py client on the same server, to look at (or damage) what the adapter stored."""
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    return "test-" + secrets.token_hex(4)


@pytest.fixture
async def make_adapter(redis_url: str, prefix: str, raw: redis.asyncio.Redis) -> AsyncIterator[MakeAdapter]:
    """Open adapters on a per-test key prefix; closes them and deletes the prefix's keys afterwards."""
    opened: list[RedisAdapter] = []

    async def make(**options: object) -> RedisAdapter:
        url = parse_url(redis_url)
        reader = url.reader({"prefix": prefix, **options})
        adapter = create(url, reader)
        reader.finish()
        await adapter.open()
        opened.append(adapter)
        return adapter

    yield make
    for adapter in opened:
        await adapter.close()
    keys = [key async for key in raw.scan_iter(match=f"{prefix}:*")]
    if keys:
        await raw.delete(*keys)
