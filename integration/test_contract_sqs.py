"""The shipped contract suite against SQS/SNS: moto's server on 127.0.0.1:4566 (or MSGBUS_TEST_SQS_URL).

The local endpoint is ``integration/_moto.py``: moto with requests serialised and its state snapshotted and
journaled, so the reconnect check's restart keeps every message sent before it (the failure suite,
integration/test_chaos.py, also kills it mid-stream).

FIFO queues (``ordering=per_key``) run the whole contract at the adapter's defaults (30 s visibility), in
integration/test_contract_defaults.py; here they run only what that run cannot: the reconnect check, which needs
the restart hook.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from integration.brokers import endpoint
from msgbus.testing import CHECKS, ContractSuite

# Short visibility and long-poll waits so the lock-expiry checks wait seconds, not the 30 s default. 4 s, not 2:
# "stop() hands back" must hand ~300 messages to another consumer within half the lock, through a moto that
# serves one request at a time; on two loaded cores that took 1.0-1.3 s (over a 2 s lock's bound of 1 s).
OPTIONS = "visibility_timeout=4&wait_time=1"
# moto accepts any credentials, but botocore must have some to sign requests.
MOTO_CREDENTIALS = "access_key_id=testing&secret_access_key=testing"


def contract_url() -> str:
    """The endpoint's bus URL with the contract's options (and test credentials for a local moto)."""
    ep = endpoint("sqs")
    url = f"{ep.url}&{OPTIONS}" if "?" in ep.url else f"{ep.url}?{OPTIONS}"
    if ep.source != "env" and "access_key_id=" not in url:
        url += f"&{MOTO_CREDENTIALS}"
    return url


class TestSqsContract(ContractSuite):
    @pytest.fixture
    def contract_url(self) -> str:
        return contract_url()

    @property  # type: ignore[override]
    def restart_broker(self) -> Callable[[], Awaitable[None]] | None:
        broker = endpoint("sqs")
        if broker.handle is None:  # from MSGBUS_TEST_SQS_URL / AWS_ENDPOINT_URL_SQS: not ours to restart
            return None
        return lambda: asyncio.to_thread(broker.restart)  # graceful: the wrapper snapshots moto's state


# The checks TestSqsFifoContract runs; the rest of the FIFO contract runs at defaults (test_contract_defaults.py).
FIFO_HERE = ("reconnect after broker restart",)


class TestSqsFifoContract(TestSqsContract):
    @pytest.fixture
    def contract_url(self) -> str:
        return contract_url() + "&ordering=per_key"


for _check in CHECKS:
    if _check.name not in FIFO_HERE:
        setattr(TestSqsFifoContract, f"test_{_check.slug}", None)  # not collected: run at defaults instead
