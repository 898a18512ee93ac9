"""The shipped contract suite against Redis: a local redis-server with AOF fsynced on every write."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from integration.brokers import endpoint
from msgbus.testing import ContractSuite

# Short locks and polls so the lock-expiry checks wait seconds, not the 30 s default.
OPTIONS = "visibility_timeout=2&poll_interval=0.05"


class TestRedisContract(ContractSuite):
    @pytest.fixture
    def contract_url(self) -> str:
        return f"{endpoint('redis').url}?{OPTIONS}"

    @property
    def restart_broker(self) -> Callable[[], Awaitable[None]] | None:  # type: ignore[override]
        broker = endpoint("redis")
        if broker.handle is None:  # from MSGBUS_TEST_REDIS_URL: not ours to restart
            return None
        return lambda: asyncio.to_thread(broker.restart, hard=True)  # SIGKILL: only the AOF survives


class TestRedisOrderedContract(TestRedisContract):
    """The whole contract again with ``ordering=per_key`` (16 leased partition streams per queue or subscription,
    issue 19), at the volumes of the unordered run: keyed messages take the partitioned path in every check that
    sends them (about 50 s with 4 checks at once, plus the reconnect check alone)."""

    jobs = 4  # the checks at once (the reconnect check alone, last)

    @pytest.fixture
    def contract_url(self) -> str:
        return f"{endpoint('redis').url}?{OPTIONS}&ordering=per_key"
