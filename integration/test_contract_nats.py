"""The shipped contract suite against NATS JetStream: a local nats-server with a file store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from integration.brokers import endpoint
from msgbus.testing import CHECKS, ContractSuite

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


# The checks ordering=per_key changes the path of: keyed sends to partition subjects, a consumer per partition with
# one unacked message, pulls of one message per partition asked again on settling, nacks and lock expiries that
# redeliver a partition's head first, dead-lettering that lets the partition move on. Not all the checks: each
# endpoint is 17 consumers here, and the file must stay short in CI.
ORDERED_CHECKS = {
    "per-key ordering",
    "competing consumers",
    "fan-out",
    "held message invisible to others",
    "retries then dead-letter",
    "at-least-once after consumer crash",
    "poison that kills its consumer",
    "only the unacked come back after close or crash",
    "stop() hands back unstarted messages",
    "graceful shutdown",
    "bulk acks and immediate nacks under run()",
    "reconnect after broker restart",
}


class TestNatsOrderedContract(TestNatsContract):
    """The contract with ``ordering=per_key`` at 16 partitions (issue 19): the checks the option changes the path of."""

    @pytest.fixture
    def contract_url(self) -> str:
        return f"{endpoint('nats').url}?{OPTIONS}&ordering=per_key"


assert {c.name for c in CHECKS} >= ORDERED_CHECKS
for _check in CHECKS:  # the others are not collected: this class runs the focused list only
    if _check.name not in ORDERED_CHECKS:
        setattr(TestNatsOrderedContract, f"test_{_check.slug}", None)
