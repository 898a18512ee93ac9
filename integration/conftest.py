"""Pytest wiring for real-broker tests: the ``broker_url`` fixture and cleanup of brokers this run started.

A test asks for a backend by name and gets an ``Endpoint`` (``.url``, ``.source``, ``.restart()``)::

    def test_roundtrip(broker_url):
        ep = broker_url("rabbitmq")      # skipped, or failed under MSGBUS_REQUIRE_BACKENDS, when none

Outside fixtures, ``from integration.brokers import endpoint`` does the same.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """Collect what a test left behind once its fixtures (and event loop) are gone, while its warning filters
    still apply: a module that expects a client library's leftovers (see test_contract_servicebus.py) ignores
    their ResourceWarnings here, and any other leak is reported with this test's neighbour instead of
    whenever the GC next comes by (on Python 3.11, a finalizer's warning inside an import's ast.parse even
    crashes pytest: "AST constructor recursion depth mismatch")."""
    result = yield
    gc.collect()
    return result


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the brokers this run started (not those already up, e.g. from ``make brokers``)."""
    release()
