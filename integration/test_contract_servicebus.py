"""The shipped contract suite against Service Bus: the local test broker (integration/sbbroker), or a real
namespace / the official emulator given by MSGBUS_TEST_SERVICEBUS_URL (a URL or a connection string)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from integration.brokers import Endpoint
from msgbus.testing import ContractSuite


class TestServiceBusContract(ContractSuite):
    @pytest.fixture
    def contract_url(self, broker_url: Callable[[str], Endpoint]) -> str:
        endpoint = broker_url("servicebus")
        if endpoint.handle is not None:  # the local test broker: a graceful restart keeps its saved state
            self.restart_broker = lambda: asyncio.to_thread(endpoint.restart)
        return endpoint.url
