"""Fixtures for the NATS adapter tests: a real nats-server (never a mocked client) and isolated prefixes."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import nats
import pytest

from msgbus._url import parse_url
from msgbus_nats import NatsAdapter, create

MakeAdapter = Callable[..., Awaitable[NatsAdapter]]


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """``MSGBUS_TEST_NATS_URL``, else the integration suite's local nats-server (skipped when absent)."""
    env = os.environ.get("MSGBUS_TEST_NATS_URL")
    if env:
        yield env
        return
    from integration import brokers

    yield brokers.endpoint("nats").url
    brokers.release()


@pytest.fixture
def prefix() -> str:
    return "test-" + secrets.token_hex(4)


@pytest.fixture
async def make_adapter(nats_url: str, prefix: str) -> AsyncIterator[MakeAdapter]:
    """Open adapters on a per-test stream prefix; closes them and deletes the prefix's streams afterwards."""
    opened: list[NatsAdapter] = []

    async def make(url: str | None = None, **options: object) -> NatsAdapter:
        parsed = parse_url(url or nats_url)
        reader = parsed.reader({"prefix": prefix, **options})
        adapter = create(parsed, reader)
        reader.finish()
        await adapter.open()
        opened.append(adapter)
        return adapter

    yield make
    for adapter in opened:
        await adapter.close()
    nc = await nats.connect(nats_url)
    try:
        reply = await nc.request("$JS.API.STREAM.NAMES", json.dumps({"subject": f"{prefix}.>"}).encode())
        for name in json.loads(reply.data).get("streams") or []:
            await nc.jsm().delete_stream(name)
    finally:
        await nc.close()
