"""The shipped contract suite against Pub/Sub: Google's pstest fake (integration/pstest/), or an emulator.

pstest differs from the real service where the suite meets it (see docs/adapters/pubsub.md): it counts
delivery attempts per message across all subscriptions of a topic (the checks use one subscription per
topic wherever attempts are compared), and it keeps state in memory, which the wrapper's journal makes
survive the restart check's SIGKILL. An emulator from PUBSUB_EMULATOR_HOST (or the official emulator in a
container) keeps nothing across a restart, so there the restart check is skipped as ``persistence``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from integration.brokers import Endpoint
from msgbus.testing import ContractSuite

# Locks of 2 s (per-message ack deadline; subscriptions cannot go below 10 s) keep lock-expiry waits short.
# ordering=true turns on per-key ordering, so the ordering check runs too.
OPTIONS = "ack_deadline=2&ordering=true&pull_timeout=1"


class TestPubSubContract(ContractSuite):
    @pytest.fixture
    def contract_url(self, broker_url: Callable[[str], Endpoint]) -> str:
        endpoint = broker_url("pubsub")
        url = endpoint.url + ("&" if "?" in endpoint.url else "?") + OPTIONS
        if endpoint.source != "local":  # the official emulator keeps nothing across a restart
            return f"{url}&persistence=none"
        # pstest with its journal: kill it (SIGKILL) and start it again on the same journal.
        self.restart_broker = lambda: asyncio.to_thread(endpoint.restart, hard=True)
        return url
