"""The error table: SDK exceptions become typed msgbus errors with the key removed."""

from __future__ import annotations

import pytest
from azure.core import exceptions as core
from azure.servicebus import exceptions as sb

from msgbus.errors import BrokerError, ConfigError, ConnectionLost, PublishError, TopologyError
from msgbus_servicebus._errors import convert, translated


@pytest.mark.parametrize(
    ("exc", "expected", "retryable"),
    [
        (sb.MessagingEntityNotFoundError(message="gone"), TopologyError, False),
        (core.ResourceNotFoundError("gone"), TopologyError, False),
        (sb.ServiceBusAuthenticationError(message="bad key"), ConfigError, False),
        (sb.MessageLockLostError(message="lost"), BrokerError, False),
        (sb.ServiceBusConnectionError(message="down"), ConnectionLost, True),
        (sb.OperationTimeoutError(message="slow"), ConnectionLost, True),
        (sb.ServiceBusServerBusyError(message="busy"), BrokerError, True),
        (OSError("reset"), ConnectionLost, True),
    ],
)
def test_table(exc: Exception, expected: type[Exception], retryable: bool) -> None:
    err = convert(exc, "act")
    assert type(err) is expected and err.retryable is retryable


def test_publish_failures_are_publish_errors_and_hide_the_key() -> None:
    with pytest.raises(PublishError) as info, translated("send", publish=True, secrets=["k3y"]):
        raise sb.ServiceBusError(message="refused with k3y")
    assert "k3y" not in str(info.value)
    assert isinstance(info.value.__cause__, sb.ServiceBusError)
