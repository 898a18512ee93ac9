"""Google client exceptions -> ``msgbus.errors``: the table; ``msgbus.adapter.ErrorTable`` applies it (its
docstring has the rules, a failed send's included)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.api_core import exceptions as gx
from google.auth import exceptions as auth_errors
from google.cloud.pubsub_v1.publisher import exceptions as publisher_errors

from msgbus.adapter import ErrorRow, ErrorTable
from msgbus.errors import BrokerError, ConfigError, ConnectionLost, InvalidMessage, PublishError, TopologyError


def _grpc(code: grpc.StatusCode) -> Callable[[BaseException], bool]:
    """A raw gRPC error (the streaming pull raises them) with status ``code``."""
    return lambda exc: isinstance(exc, grpc.RpcError) and exc.code() == code


def is_not_found(exc: BaseException) -> bool:
    """Whether the service answered that the topic or subscription does not exist."""
    return isinstance(exc, gx.NotFound) or _grpc(grpc.StatusCode.NOT_FOUND)(exc)


# Most specific first; the first matching row wins. ``retryable`` None keeps the class default.
ERRORS = ErrorTable(
    "Pub/Sub",
    [
        ErrorRow(_grpc(grpc.StatusCode.NOT_FOUND), TopologyError),
        ErrorRow(_grpc(grpc.StatusCode.UNAVAILABLE), ConnectionLost),
        ErrorRow(_grpc(grpc.StatusCode.DEADLINE_EXCEEDED), ConnectionLost),
        ErrorRow(_grpc(grpc.StatusCode.INVALID_ARGUMENT), InvalidMessage),
        (grpc.RpcError, BrokerError, None),  # any other status
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
    ],
)
convert = ERRORS.convert
translated = ERRORS.translated

# Everything the Google clients raise, never a user's exception (what the adapter catches around them).
CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    gx.GoogleAPIError,
    auth_errors.GoogleAuthError,
    publisher_errors.PublishToPausedOrderingKeyException,
    grpc.RpcError,
    TimeoutError,
    OSError,
)
