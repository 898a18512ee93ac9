"""The pytest plugin shipped with msgbus (entry point ``pytest11``): a bus per test, on ``memory://`` by default
or on the broker that ``--msgbus-url`` / ``MSGBUS_TEST_URL`` names, so a suite runs on a real broker unchanged.

Fixtures: ``msgbus_url`` (the URL), ``bus`` (an open ``msgbus.Bus``; needs pytest-asyncio) and ``sync_bus`` (an
open ``msgbus.sync.SyncBus``). The waiting helpers are in ``msgbus.testing``. See docs/testing.md.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import msgbus
import msgbus.sync
from msgbus import _memory

URL_ENV = "MSGBUS_TEST_URL"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("msgbus")
    group.addoption(
        "--msgbus-url",
        default=None,
        help=f"bus URL for the msgbus fixtures (default: ${URL_ENV}, else a fresh memory:// namespace per test)",
    )


@pytest.fixture
def msgbus_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """``--msgbus-url``, else ``$MSGBUS_TEST_URL``, else ``memory://<fresh name>`` (forgotten after the test),
    so that tests on the default never see each other's messages."""
    url = request.config.getoption("msgbus_url") or os.environ.get(URL_ENV)
    if url:
        yield url
        return
    namespace = uuid.uuid4().hex
    yield f"memory://{namespace}"
    _memory.reset(namespace)


@pytest.fixture
def sync_bus(msgbus_url: str) -> Iterator[msgbus.sync.SyncBus]:
    """An open blocking bus on ``msgbus_url``, closed after the test."""
    with msgbus.sync.connect(msgbus_url) as opened:
        yield opened


try:
    import pytest_asyncio
except ImportError:  # async fixtures need an async plugin; say which instead of a coroutine never awaited

    @pytest.fixture(name="bus")
    def _bus_needs_pytest_asyncio(msgbus_url: str) -> Any:
        """An open ``msgbus.Bus``: needs pytest-asyncio (``pip install pytest-asyncio``); ``sync_bus`` does not."""
        pytest.fail("the msgbus 'bus' fixture needs pytest-asyncio: pip install pytest-asyncio", pytrace=False)

else:

    @pytest_asyncio.fixture(name="bus")
    async def _bus(msgbus_url: str) -> AsyncIterator[msgbus.Bus]:
        """An open ``msgbus.Bus`` on ``msgbus_url``, closed after the test."""
        async with msgbus.connect(msgbus_url) as opened:
            yield opened
