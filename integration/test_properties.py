"""The property-based hostile-input suites (integration/_properties.py) on every real broker, with a short
profile: generated send arguments, payloads/content types/headers injected through ``Adapter.send``, and
handler outcomes under ``run()``. The full profile runs on memory:// and sqlite:// (tests/test_properties.py).

One parametrized test per suite and backend, Service Bus last: its SDK leaves sockets of closed links to the
garbage collector (see test_contract_servicebus.py), which must not surface in another broker's test.
"""

from __future__ import annotations

import pytest

import msgbus
from integration import _properties
from integration.brokers import endpoint

PROFILE = _properties.Profile(sends=12, batches=6, outcomes=5, example_timeout=90)

# Short locks, so that the final "nothing comes back" window waits seconds: the contract's own options.
_OPTIONS = {
    "rabbitmq": "",
    "redis": "visibility_timeout=2&poll_interval=0.05",
    "kafka": "partitions=2&visibility_timeout=2&session_timeout=3&heartbeat_interval=0.3&rebalance_timeout=20",
    "pubsub": "ack_deadline=2&pull_timeout=1",
    "sqs": "visibility_timeout=2&wait_time=1",
    "nats": "ack_wait=2",
    "servicebus": "",
}
_SDK_LEFTOVERS = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:unclosed:ResourceWarning"),
]
BACKENDS = [pytest.param(b, marks=_SDK_LEFTOVERS if b == "servicebus" else ()) for b in _OPTIONS]


def _url(backend: str) -> str:
    ep = endpoint(backend)  # skipped without a broker, failed when MSGBUS_REQUIRE_BACKENDS names it
    scheme = ep.url.partition("://")[0]
    if scheme not in msgbus.schemes():  # msgbus-nats joined main after this suite was written
        pytest.skip(f"no adapter for {scheme}:// is installed")
    options = _OPTIONS[backend]
    if backend == "sqs" and ep.source != "env" and "access_key_id=" not in ep.url:
        options += "&access_key_id=testing&secret_access_key=testing"  # moto takes any; botocore must sign
    if not options:
        return ep.url
    return ep.url + ("&" if "?" in ep.url else "?") + options


@pytest.mark.parametrize("backend", BACKENDS, scope="module")  # grouped by backend, Service Bus last
def test_send_arguments(backend: str) -> None:
    _properties.send_arguments(_url(backend), PROFILE)


@pytest.mark.parametrize("backend", BACKENDS, scope="module")  # grouped by backend, Service Bus last
def test_decode_path(backend: str) -> None:
    _properties.decode_path(_url(backend), PROFILE)


@pytest.mark.parametrize("backend", BACKENDS, scope="module")  # grouped by backend, Service Bus last
def test_handler_outcomes(backend: str) -> None:
    _properties.handler_outcomes(_url(backend), PROFILE)
