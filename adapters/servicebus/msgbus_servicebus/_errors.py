"""azure-servicebus / azure-core exceptions -> ``msgbus.errors``: the table; ``msgbus.adapter.ErrorTable``
applies it (its docstring has the rules, a failed send's included)."""

from __future__ import annotations

from azure.core import exceptions as core
from azure.servicebus import exceptions as sb

from msgbus.adapter import ErrorRow, ErrorTable
from msgbus.errors import BrokerError, ConfigError, ConnectionLost, PublishError, TopologyError


def _handler_shut_down(exc: BaseException) -> bool:
    """The SDK refuses to settle through a receiver whose handler shut down (after a lost connection) with a
    ValueError; the lock went with the connection, so the message comes back. Other ValueErrors are not ours."""
    return isinstance(exc, ValueError) and "handler has already been shutdown" in str(exc)


# Most specific first; the first matching row wins. ``retryable`` None keeps the class default.
ERRORS = ErrorTable(
    "Service Bus",
    [
        # The adapter checks sizes first: a limit mismatch.
        ErrorRow(
            sb.MessageSizeExceededError,
            PublishError,
            False,
            " (lower the max_message_size option to the entity's limit)",
        ),
        (sb.MessagingEntityNotFoundError, TopologyError, None),
        (core.ResourceNotFoundError, TopologyError, None),  # administration client: no such entity
        (sb.ServiceBusAuthenticationError, ConfigError, None),  # wrong key: fix the URL, do not retry
        (core.ClientAuthenticationError, ConfigError, None),
        (sb.ServiceBusAuthorizationError, BrokerError, False),
        (sb.MessageLockLostError, BrokerError, False),  # the lock expired: the message comes back anyway
        (sb.SessionLockLostError, BrokerError, False),  # the same for a session's messages (ordering=per_key)
        (sb.MessageAlreadySettled, BrokerError, False),
        (sb.MessagingEntityDisabledError, TopologyError, None),
        (sb.ServiceBusQuotaExceededError, BrokerError, True),
        (sb.ServiceBusServerBusyError, BrokerError, True),
        (sb.ServiceBusConnectionError, ConnectionLost, None),
        (sb.ServiceBusCommunicationError, ConnectionLost, None),
        (sb.OperationTimeoutError, ConnectionLost, None),
        (core.ServiceRequestError, ConnectionLost, None),  # administration client: no answer
        (OSError, ConnectionLost, None),
        (sb.ServiceBusError, BrokerError, None),
        (core.AzureError, BrokerError, None),
        ErrorRow(_handler_shut_down, BrokerError, False),
    ],
)
convert = ERRORS.convert
translated = ERRORS.translated
