"""The one place aiokafka exceptions become ``msgbus.errors`` (the original stays on ``__cause__``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from aiokafka import errors as kx

from msgbus.adapter import redact
from msgbus.errors import (
    BrokerError,
    ConfigError,
    ConnectionLost,
    InvalidMessage,
    MsgbusError,
    PublishError,
    TopologyError,
)

# Most specific first; the first matching row wins. ``retryable`` None keeps the class default.
_TABLE: tuple[tuple[type[BaseException], type[MsgbusError], bool | None], ...] = (
    (kx.SaslAuthenticationFailed, ConfigError, None),  # wrong credentials: fix the URL, do not retry
    (kx.TopicAuthorizationFailedError, BrokerError, False),
    (kx.GroupAuthorizationFailedError, BrokerError, False),
    (kx.ClusterAuthorizationFailedError, BrokerError, False),
    (kx.UnknownTopicOrPartitionError, TopologyError, None),
    (kx.InvalidTopicError, ConfigError, None),
    (kx.MessageSizeTooLargeError, InvalidMessage, None),
    (kx.RecordTooLargeError, InvalidMessage, None),
    (kx.KafkaConnectionError, ConnectionLost, None),
    (kx.NodeNotReadyError, ConnectionLost, None),
    (kx.RequestTimedOutError, ConnectionLost, None),
    (kx.KafkaTimeoutError, ConnectionLost, None),
    (kx.NotLeaderForPartitionError, BrokerError, None),
    (kx.NotEnoughReplicasError, BrokerError, None),
    (asyncio.TimeoutError, ConnectionLost, None),
    (OSError, ConnectionLost, None),
    (kx.KafkaError, BrokerError, None),
)


def translate(
    exc: BaseException, action: str, *, publish: bool = False, secrets: Sequence[str | None] = ()
) -> Exception:
    """The ``msgbus`` error for ``exc``; ``publish`` marks a send, whose unconfirmed ones are ``PublishError``."""
    text = f"kafka {action} failed: {redact(str(exc) or type(exc).__name__, list(secrets))}"
    for source, target, retryable in _TABLE:
        if isinstance(exc, source):
            if publish and issubclass(target, BrokerError) and target is not TopologyError:
                target = PublishError  # the broker did not confirm: the record may not be stored
            err = target(text)
            if retryable is not None:
                err.retryable = retryable
            return err
    return BrokerError(text)


@contextmanager
def translated(action: str, *, publish: bool = False, secrets: Sequence[str | None] = ()) -> Iterator[None]:
    """Re-raise any aiokafka (or socket) exception in the block as a ``msgbus`` error, ``from`` the original."""
    try:
        yield
    except MsgbusError:
        raise
    except (TimeoutError, kx.KafkaError, OSError) as exc:
        raise translate(exc, action, publish=publish, secrets=secrets) from exc
