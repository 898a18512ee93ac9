"""Broker fixtures for the SPI-level tests: a real RabbitMQ from the environment or the local launcher.

URL: ``MSGBUS_TEST_RABBITMQ_URL`` if set, else ``integration.brokers`` (starts the local test broker on
127.0.0.1:5672 when rabbitmq-server is installed). Without either the broker tests are skipped (or fail
when ``MSGBUS_REQUIRE_BACKENDS`` names rabbitmq).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest

from msgbus._url import parse_url
from msgbus_rabbitmq import RabbitMQAdapter, create


@pytest.fixture(scope="session")
def broker() -> Any:
    """The broker endpoint (``.url``; ``.restart()`` when it is a local process we may restart)."""
    url = os.environ.get("MSGBUS_TEST_RABBITMQ_URL")
    if url:
        return _EnvEndpoint(url)
    try:
        from integration import brokers
    except ImportError:
        pytest.skip("no RabbitMQ: set MSGBUS_TEST_RABBITMQ_URL or run pytest from the repository root")
    return brokers.endpoint("rabbitmq")


class _EnvEndpoint:
    handle = None

    def __init__(self, url: str) -> None:
        self.url = url


@pytest.fixture
def make_adapter(broker: Any) -> Callable[..., RabbitMQAdapter]:
    """Builds (unopened) adapters on the test broker with extra URL options."""

    def make(**options: object) -> RabbitMQAdapter:
        parsed = parse_url(broker.url)
        reader = parsed.reader(options)
        adapter = create(parsed, reader)
        reader.finish()
        return adapter

    return make


@pytest.fixture
async def adapter(make_adapter: Callable[..., RabbitMQAdapter]) -> AsyncIterator[RabbitMQAdapter]:
    a = make_adapter()
    await a.open()
    yield a
    await a.close()


@pytest.fixture
async def names(broker: Any) -> AsyncIterator[Callable[[str], str]]:
    """Fresh queue/topic names; every queue and exchange they lead to is deleted after the test."""
    made: list[str] = []

    def name(role: str) -> str:
        made.append(f"t-rmq-{role}-{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield name
    connection = await aio_pika.connect(broker.url)
    try:
        channel = await connection.channel()
        underlay = await channel.get_underlay_channel()
        for base in made:
            for main in (base, f"{base}.sub", f"{base}.s2"):
                for queue in (main, f"{main}.dlq", *(f"{main}.p{i}" for i in range(16))):  # partitions: ordering
                    await underlay.queue_delete(queue)
            await underlay.exchange_delete(base)
    finally:
        await connection.close()
