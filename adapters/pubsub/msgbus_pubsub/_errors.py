"""The one place Google client exceptions become ``msgbus.errors`` (the original stays on ``__cause__``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from google.api_core import exceptions as gx
from google.auth import exceptions as auth_errors
from google.cloud.pubsub_v1.publisher import exceptions as publisher_errors

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
    (auth_errors.DefaultCredentialsError, ConfigError, None),  # no credentials and no emulator_host
    (auth_errors.GoogleAuthError, BrokerError, False),
    (gx.NotFound, TopologyError, None),
    (gx.AlreadyExists, TopologyError, None),
    (gx.Unauthenticated, BrokerError, False),
    (gx.PermissionDenied, BrokerError, False),
    (gx.InvalidArgument, InvalidMessage, None),
    (gx.FailedPrecondition, BrokerError, False),
    (gx.ServiceUnavailable, ConnectionLost, None),
    (gx.DeadlineExceeded, ConnectionLost, None),
    (gx.RetryError, ConnectionLost, None),  # retries ran out, most often while the service was unreachable
    (gx.GoogleAPIError, BrokerError, None),
    (publisher_errors.PublishToPausedOrderingKeyException, PublishError, None),
    (TimeoutError, ConnectionLost, None),
    (OSError, ConnectionLost, None),
)

_GRPC_CODES = {
    grpc.StatusCode.NOT_FOUND: TopologyError,
    grpc.StatusCode.UNAVAILABLE: ConnectionLost,
    grpc.StatusCode.DEADLINE_EXCEEDED: ConnectionLost,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidMessage,
}


def is_not_found(exc: BaseException) -> bool:
    """Whether the service answered that the topic or subscription does not exist."""
    if isinstance(exc, gx.NotFound):
        return True
    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.NOT_FOUND


def translate(exc: BaseException, action: str, *, publish: bool = False) -> MsgbusError:
    """The ``msgbus`` error for ``exc``; ``publish`` marks a send, whose refusals are ``PublishError``."""
    if isinstance(exc, MsgbusError):
        return exc
    text = f"pubsub {action} failed: {type(exc).__name__}: {exc}"
    target: type[MsgbusError] = BrokerError
    retryable: bool | None = None
    if isinstance(exc, grpc.RpcError):
        target = _GRPC_CODES.get(exc.code(), BrokerError)
    else:
        for source, mapped, flag in _TABLE:
            if isinstance(exc, source):
                target, retryable = mapped, flag
                break
    if publish and target is BrokerError and retryable is None:
        target = PublishError
    err = target(text)
    if retryable is not None:
        err.retryable = retryable
    return err


# What ``translated`` catches: everything the Google clients raise, never a user's exception.
CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    gx.GoogleAPIError,
    auth_errors.GoogleAuthError,
    publisher_errors.PublishToPausedOrderingKeyException,
    grpc.RpcError,
    TimeoutError,
    OSError,
)


@contextmanager
def translated(action: str, *, publish: bool = False) -> Iterator[None]:
    """Re-raise any Google client exception in the block as a ``msgbus`` error, ``from`` the original."""
    try:
        yield
    except MsgbusError:
        raise
    except CLIENT_ERRORS as exc:
        raise translate(exc, action, publish=publish) from exc
