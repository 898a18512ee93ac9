"""The one place azure-servicebus / azure-core exceptions become ``msgbus.errors`` (original on ``__cause__``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from azure.core import exceptions as core
from azure.servicebus import exceptions as sb

from msgbus.adapter import redact
from msgbus.errors import (
    BrokerError,
    ConfigError,
    ConnectionLost,
    MsgbusError,
    PublishError,
    TopologyError,
)

# Most specific first; the first matching row wins. ``retryable`` None keeps the class default.
_TABLE: tuple[tuple[type[BaseException], type[MsgbusError], bool | None], ...] = (
    (sb.MessagingEntityNotFoundError, TopologyError, None),
    (core.ResourceNotFoundError, TopologyError, None),  # administration client: no such entity
    (sb.ServiceBusAuthenticationError, ConfigError, None),  # wrong key: fix the URL, do not retry
    (core.ClientAuthenticationError, ConfigError, None),
    (sb.ServiceBusAuthorizationError, BrokerError, False),
    (sb.MessageLockLostError, BrokerError, False),  # the lock expired: the message comes back anyway
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
)


def translate(
    exc: BaseException, action: str, *, publish: bool = False, secrets: Sequence[str | None] = ()
) -> Exception:
    """The ``msgbus`` error for ``exc``; ``publish`` marks a send, whose refusals are ``PublishError``."""
    text = f"servicebus {action} failed: {redact(str(exc) or type(exc).__name__, list(secrets))}"
    if isinstance(exc, sb.MessageSizeExceededError):  # the adapter checks sizes first: a limit mismatch
        refused = PublishError(text + " (lower the max_message_size option to the entity's limit)")
        refused.retryable = False
        return refused
    for source, target, retryable in _TABLE:
        if isinstance(exc, source):
            if publish and target is BrokerError and retryable is None:
                target = PublishError
            err = target(text)
            if retryable is not None:
                err.retryable = retryable
            return err
    return BrokerError(text)


@contextmanager
def translated(action: str, *, publish: bool = False, secrets: Sequence[str | None] = ()) -> Iterator[None]:
    """Re-raise any SDK (or socket) exception in the block as a ``msgbus`` error, ``from`` the original."""
    try:
        yield
    except MsgbusError:
        raise
    except (sb.ServiceBusError, core.AzureError, OSError) as exc:
        raise translate(exc, action, publish=publish, secrets=secrets) from exc
    except ValueError as exc:
        # The SDK refuses to settle through a receiver whose handler shut down (after a lost connection)
        # with a ValueError; the lock went with the connection, so the message comes back: not retryable.
        if "handler has already been shutdown" not in str(exc):
            raise
        err = BrokerError(f"servicebus {action} failed: {redact(str(exc), list(secrets))}")
        err.retryable = False
        raise err from exc
