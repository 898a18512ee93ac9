"""The shipped contract suite against RabbitMQ: the local test broker (or MSGBUS_TEST_RABBITMQ_URL)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from integration.brokers import Endpoint
from msgbus.testing import ContractSuite


class TestRabbitMQContract(ContractSuite):
    @pytest.fixture
    def contract_url(self, broker_url: Callable[[str], Endpoint]) -> str:
        endpoint = broker_url("rabbitmq")
        if endpoint.handle is not None:  # a local broker we may restart: enables the reconnect check
            self.restart_broker = lambda: asyncio.to_thread(endpoint.restart)
        return endpoint.url


class TestRabbitMQOrderedContract(ContractSuite):
    """The whole contract again with ``ordering=per_key``: every endpoint is single-active-consumer partition
    queues, a receiver consumes them all and holds each key's later deliveries (issue 19)."""

    jobs = 8  # the checks at once (the reconnect check alone, last): about the time of the longest

    @pytest.fixture
    def contract_url(self, broker_url: Callable[[str], Endpoint]) -> str:
        endpoint = broker_url("rabbitmq")
        if endpoint.handle is not None:
            self.restart_broker = lambda: asyncio.to_thread(endpoint.restart)
        return f"{endpoint.url}{'&' if '?' in endpoint.url else '?'}ordering=per_key"
