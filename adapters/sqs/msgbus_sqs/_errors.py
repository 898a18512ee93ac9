"""The one place botocore/aiobotocore exceptions become ``msgbus.errors`` (the original stays on ``__cause__``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from botocore import exceptions as bx

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

# AWS error codes (ClientError) by what they mean for the caller.
MISSING = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NotFound", "NotFoundException"})
_CONFLICT = frozenset({"QueueAlreadyExists", "QueueNameExists", "AWS.SimpleQueueService.QueueDeletedRecently"})
_DENIED = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "AuthorizationError",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
        "ExpiredToken",
        "InvalidSecurity",
        "KMS.AccessDeniedException",
    }
)
_BAD_MESSAGE = frozenset(
    {
        "InvalidMessageContents",
        "InvalidParameterValue",
        "InvalidParameterValueException",
        "InvalidAttributeValue",
        "InvalidAttributeName",
        "BatchRequestTooLong",
        "MessageTooLong",
        "AWS.SimpleQueueService.BatchRequestTooLong",
    }
)
_STALE_RECEIPT = frozenset(
    {
        "ReceiptHandleIsInvalid",
        "InvalidReceiptHandle",
        "MessageNotInflight",
        "AWS.SimpleQueueService.MessageNotInflight",
    }
)

# Non-ClientError exceptions, most specific first: (source, target, retryable or None for the class default).
_TABLE: tuple[tuple[type[BaseException], type[MsgbusError], bool | None], ...] = (
    (bx.NoCredentialsError, ConfigError, None),
    (bx.PartialCredentialsError, ConfigError, None),
    (bx.NoRegionError, ConfigError, None),
    (bx.ProfileNotFound, ConfigError, None),
    (bx.ParamValidationError, InvalidMessage, None),
    (bx.EndpointConnectionError, ConnectionLost, None),
    (bx.ConnectionClosedError, ConnectionLost, None),
    (bx.ConnectTimeoutError, ConnectionLost, None),
    (bx.ReadTimeoutError, ConnectionLost, None),
    (bx.HTTPClientError, ConnectionLost, None),
    (bx.BotoCoreError, BrokerError, None),
    (OSError, ConnectionLost, None),
)


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ``ClientError`` ("" for anything else)."""
    if isinstance(exc, bx.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def is_missing(exc: BaseException) -> bool:
    """Whether AWS answered that the queue or topic does not exist (deleted, or the endpoint lost it)."""
    return error_code(exc) in MISSING


def translate(
    exc: BaseException, action: str, *, publish: bool = False, secrets: Sequence[str | None] = ()
) -> MsgbusError:
    """The ``msgbus`` error for ``exc``; ``publish`` marks a send, whose refusals are ``PublishError``."""
    text = f"sqs {action} failed: {redact(str(exc) or type(exc).__name__, list(secrets))}"
    if isinstance(exc, bx.ClientError):
        code = error_code(exc)
        if code in MISSING:
            return TopologyError(text)
        if code in _CONFLICT:
            return TopologyError(f"{text} (declared with different attributes?)")
        if code in _BAD_MESSAGE and publish:
            return InvalidMessage(text)
        err: MsgbusError = PublishError(text) if publish else BrokerError(text)
        if code in _DENIED or code in _STALE_RECEIPT or code in _BAD_MESSAGE:
            err.retryable = False
        return err
    for source, target, retryable in _TABLE:
        if isinstance(exc, source):
            if publish and target is BrokerError:
                target = PublishError
            out = target(text)
            if retryable is not None:
                out.retryable = retryable
            return out
    return PublishError(text) if publish else BrokerError(text)


@contextmanager
def translated(action: str, *, publish: bool = False, secrets: Sequence[str | None] = ()) -> Iterator[None]:
    """Re-raise any botocore (or socket) exception in the block as a ``msgbus`` error, ``from`` the original."""
    try:
        yield
    except MsgbusError:
        raise
    except (bx.BotoCoreError, bx.ClientError, OSError) as exc:
        raise translate(exc, action, publish=publish, secrets=secrets) from exc
