"""Fixtures for the PostgreSQL adapter tests: a real server (never a mocked driver) and a schema per test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from urllib.parse import urlsplit

import asyncpg
import pytest

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


class Proxy:
    """A TCP relay to the server that can go silent (drop bytes, keep sockets open): a half-open link."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.silent = False
        self.server: asyncio.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(65536):
                if not self.silent:
                    dst.write(data)
                    await dst.drain()
        dst.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@pytest.fixture
async def proxied(pg_url: str) -> AsyncIterator[tuple[Proxy, str]]:
    """A relay to the server that a test can make silent, and the server's URL through it."""
    parts = urlsplit(pg_url)
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    await proxy.start()
    try:
        yield proxy, pg_url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}")
    finally:
        await proxy.close()
