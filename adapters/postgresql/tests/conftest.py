"""Fixtures for the PostgreSQL adapter tests: a real server (never a mocked driver) and a schema per test."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from urllib.parse import urlsplit

import asyncpg
import pytest

from integration._proxy import SilentProxy
from msgbus._url import parse_url
from msgbus_postgresql import PostgresAdapter, create

MakeAdapter = Callable[..., Awaitable[PostgresAdapter]]


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """``MSGBUS_TEST_POSTGRESQL_URL``, else the integration suite's local server (skipped when absent)."""
    env = os.environ.get("MSGBUS_TEST_POSTGRESQL_URL")
    if env:
        yield env
        return
    from integration import brokers

    yield brokers.endpoint("postgresql").url
    brokers.release()


@pytest.fixture
def schema() -> str:
    return "test_" + secrets.token_hex(4)


@pytest.fixture
async def make_adapter(pg_url: str, schema: str) -> AsyncIterator[MakeAdapter]:
    """Open adapters on a per-test schema; closes them and drops the schema afterwards."""
    opened: list[PostgresAdapter] = []

    async def make(url: str | None = None, **options: object) -> PostgresAdapter:
        parsed = parse_url(url or pg_url)
        reader = parsed.reader({"schema": schema, **options})
        adapter = create(parsed, reader)
        reader.finish()
        await adapter.open()
        opened.append(adapter)
        return adapter

    yield make
    for adapter in opened:
        await adapter.close()
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def proxied(pg_url: str) -> AsyncIterator[tuple[SilentProxy, str]]:
    """A relay to the server that a test can make silent, and the server's URL through it."""
    parts = urlsplit(pg_url)
    proxy = SilentProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    await proxy.start()
    try:
        yield proxy, pg_url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}")
    finally:
        await proxy.close()
