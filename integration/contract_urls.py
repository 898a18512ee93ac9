"""The bus URL of each real broker's contract runs: tuned (the options of its test_contract_*.py: short locks,
fast rebalances) or at the adapter's defaults (only what reaching the test broker needs: address, test
credentials, the emulator's facts such as Service Bus's entity lock duration)."""

from __future__ import annotations

from collections.abc import Callable

from integration import (
    test_contract_kafka,
    test_contract_nats,
    test_contract_postgresql,
    test_contract_pubsub,
    test_contract_redis,
    test_contract_sqs,
)
from integration.brokers import Endpoint

__all__ = ["BACKENDS", "at_defaults", "restart", "tuned"]

BACKENDS = ("rabbitmq", "redis", "kafka", "pubsub", "sqs", "servicebus", "nats", "postgresql")

# Options each backend's contract test adds to its endpoint's URL (RabbitMQ and Service Bus add none).
_TUNED = {
    "kafka": test_contract_kafka.OPTIONS,
    "nats": test_contract_nats.OPTIONS,
    "postgresql": test_contract_postgresql.OPTIONS,
    "pubsub": test_contract_pubsub.OPTIONS,
    "redis": test_contract_redis.OPTIONS,
    "sqs": test_contract_sqs.OPTIONS,
}


def _with(url: str, options: str) -> str:
    return url if not options else url + ("&" if "?" in url else "?") + options


def at_defaults(ep: Endpoint) -> str:
    """``ep``'s URL with nothing added but what the local stand-ins need to be reached (moto's credentials)."""
    if ep.backend == "sqs" and ep.source != "env" and "access_key_id=" not in ep.url:
        return _with(ep.url, test_contract_sqs.MOTO_CREDENTIALS)
    return ep.url


def tuned(ep: Endpoint) -> str:
    """The URL ``integration/test_contract_<backend>.py`` runs the contract with."""
    url = _with(at_defaults(ep), _TUNED.get(ep.backend, ""))
    if ep.backend == "pubsub" and ep.source != "local":  # an emulator keeps nothing across a restart
        url = _with(url, "persistence=none")
    return url


def restart(ep: Endpoint) -> Callable[[], None]:
    """The restart each contract test gives the reconnect check: a kill where only what reached the disk
    should survive (Kafka, Redis, NATS's file store, PostgreSQL, pstest's journal), a graceful restart where
    the stand-in keeps its state only then (moto's snapshot, the Service Bus test broker) and for RabbitMQ."""
    hard = ep.backend in ("kafka", "redis", "pubsub", "nats", "postgresql")
    return lambda: ep.restart(hard=hard)
