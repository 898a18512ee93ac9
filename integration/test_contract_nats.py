"""The shipped contract suite against NATS JetStream: a local nats-server with a file store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from integration.brokers import endpoint
from msgbus.testing import ContractSuite

# A 2 s ack wait (the lock) so the checks that wait out a lock take seconds, not the 30 s default. The
# contract also passes at the defaults (docs/adapters/nats.md has that run); only its duration differs.
OPTIONS = "ack_wait=2"


class TestNatsContract(ContractSuite):
    @pytest.fixture
    def contract_url(self) -> str:
        return f"{endpoint('nats').url}?{OPTIONS}"

    @property  # type: ignore[override]
    def restart_broker(self) -> Callable[[], Awaitable[None]] | None:
        broker = endpoint("nats")
        if broker.handle is None:  # from MSGBUS_TEST_NATS_URL: not ours to restart
            return None
        return lambda: asyncio.to_thread(broker.restart, hard=True)  # SIGKILL: what the file store wrote survives
