"""The shipped contract suite against Apache Kafka: a local KRaft broker started from Maven Central jars."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from integration.brokers import endpoint
from msgbus.testing import ContractSuite

# Short lock (visibility), session and heartbeat so lock-expiry waits, a killed consumer's session and each
# rebalance take seconds, not Kafka's defaults. 8 partitions let several of the 20 competing consumers work.
# A revoked member waits up to 0.8 x rebalance_timeout for its handlers: more than the 2.5 locks (20 s) that
# "lock extended for long handlers" holds one (at 20 s it waited 16 s, and 2 held messages moved on).
OPTIONS = "partitions=8&visibility_timeout=8&session_timeout=3&heartbeat_interval=0.3&rebalance_timeout=60"


@pytest.fixture(autouse=True)
def _client_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Group membership and commit events, shown with a failing check: what a stuck rebalance looked like."""
    caplog.set_level(logging.INFO, logger="aiokafka")
    caplog.set_level(logging.INFO, logger="msgbus.kafka")


class TestKafkaContract(ContractSuite):
    @pytest.fixture
    def contract_url(self) -> str:
        return f"{endpoint('kafka').url}?{OPTIONS}"

    @property  # type: ignore[override]
    def restart_broker(self) -> Callable[[], Awaitable[None]] | None:
        broker = endpoint("kafka")
        if broker.handle is None:  # from MSGBUS_TEST_KAFKA_URL: not ours to restart
            return None
        return lambda: asyncio.to_thread(broker.restart, hard=True)  # SIGKILL: only what reached the log survives
