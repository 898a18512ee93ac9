"""botocore/aiobotocore exceptions -> ``msgbus.errors``: the table; ``msgbus.adapter.ErrorTable`` applies it (its
docstring has the rules, a failed send's included)."""

from __future__ import annotations

from collections.abc import Callable

from botocore import exceptions as bx

from msgbus.adapter import ErrorRow, ErrorTable
from msgbus.errors import BrokerError, ConfigError, ConnectionLost, InvalidMessage, TopologyError

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


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ``ClientError`` ("" for anything else)."""
    if isinstance(exc, bx.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def is_missing(exc: BaseException) -> bool:
    """Whether AWS answered that the queue or topic does not exist (deleted, or the endpoint lost it)."""
    return error_code(exc) in MISSING


def _code(codes: frozenset[str]) -> Callable[[BaseException], bool]:
    """A ``ClientError`` whose AWS error code is one of ``codes``."""
    return lambda exc: error_code(exc) in codes


# Most specific first; the first matching row wins. ``retryable`` None keeps the class default.
ERRORS = ErrorTable(
    "SQS",
    [
        ErrorRow(_code(MISSING), TopologyError),
        ErrorRow(_code(_CONFLICT), TopologyError, None, " (declared with different attributes?)"),
        ErrorRow(_code(_BAD_MESSAGE), InvalidMessage, sends_only=True),
        ErrorRow(_code(_DENIED | _STALE_RECEIPT | _BAD_MESSAGE), BrokerError, False),
        (bx.ClientError, BrokerError, None),
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
    ],
)
convert = ERRORS.convert
translated = ERRORS.translated
