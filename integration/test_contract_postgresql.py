"""The shipped contract suite against PostgreSQL: a local server from the Debian package (its own cluster)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from integration.brokers import endpoint
from msgbus.testing import ContractSuite

# A 2 s lease so the checks that wait out a lock take seconds, not the 30 s default; its own schema so
# nothing else on the server is touched.
OPTIONS = "visibility_timeout=2&schema=msgbus_contract"


class TestPostgresContract(ContractSuite):
    @pytest.fixture
    def contract_url(self) -> str:
        return f"{endpoint('postgresql').url}?{OPTIONS}"

    @property  # type: ignore[override]
    def restart_broker(self) -> Callable[[], Awaitable[None]] | None:
        broker = endpoint("postgresql")
        if broker.handle is None:  # from MSGBUS_TEST_POSTGRESQL_URL: not ours to restart
            return None
        return lambda: asyncio.to_thread(broker.restart, hard=True)  # SIGKILL: only what was committed survives
