"""The shipped contract suite against Redis: a local redis-server with AOF fsynced on every write."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from integration.brokers import endpoint
from msgbus.testing import CHECKS, ContractSuite

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


class TestRedisOrderedContract(ContractSuite):
    """The contract with ``ordering=per_key`` (16 leased partition streams per queue or subscription): the checks the
    option changes the path of (issue 19), at the volumes of the unordered run."""

    jobs = 4  # the checks at once (the reconnect check alone, last)

    @pytest.fixture
    def contract_url(self) -> str:
        return f"{endpoint('redis').url}?{OPTIONS}&ordering=per_key"

    @property
    def restart_broker(self) -> Callable[[], Awaitable[None]] | None:  # type: ignore[override]
        broker = endpoint("redis")
        if broker.handle is None:
            return None
        return lambda: asyncio.to_thread(broker.restart, hard=True)


# The checks ordering=per_key changes the path of: keyed sends to partitions, leases shared and taken over, the per-key
# hold, nacks delivered again in place, delivery counts across crashes. The others take the unordered path.
ORDERED_CHECKS = {
    "per-key ordering",
    "competing consumers",
    "fan-out",
    "cancelled subscription stops receiving",
    "held message invisible to others",
    "nack redelivers",
    "retries then dead-letter",
    "at-least-once after consumer crash",
    "poison that kills its consumer",
    "acks survive a crash",
    "only the unacked come back after close or crash",
    "stop() hands back unstarted messages",
    "graceful shutdown",
    "bulk acks and immediate nacks under run()",
    "delayed delivery",
    "run_batch settles each message of a batch as told",
    "redrive returns every dead letter once",
    "a request gets exactly its reply",
    "reconnect after broker restart",
}
assert {c.name for c in CHECKS} >= ORDERED_CHECKS
for _check in CHECKS:  # the others are not collected: this class runs the focused list only
    if _check.name not in ORDERED_CHECKS:
        setattr(TestRedisOrderedContract, f"test_{_check.slug}", None)
