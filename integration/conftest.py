"""Pytest wiring for real-broker tests: the ``broker_url`` fixture and cleanup of brokers this run started.

A test asks for a backend by name and gets an ``Endpoint`` (``.url``, ``.source``, ``.restart()``)::

    def test_roundtrip(broker_url):
        ep = broker_url("rabbitmq")      # skipped, or failed under MSGBUS_REQUIRE_BACKENDS, when none

Outside fixtures, ``from integration.brokers import endpoint`` does the same.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from integration.brokers import Endpoint, endpoint, release


@pytest.fixture(scope="session")
def broker_url() -> Callable[[str], Endpoint]:
    """A factory: ``broker_url(backend)`` -> Endpoint, resolved once per run (env, local, container, skip)."""
    return endpoint


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under integration/ needs a real broker: mark it so ``-m "not integration"`` leaves it out."""
    for item in items:
        if "integration" in item.nodeid.split("/")[0:1]:
            item.add_marker(pytest.mark.integration)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the brokers this run started (not those already up, e.g. from ``make brokers``)."""
    release()
