"""The error table: Google client exceptions become msgbus errors, the original on __cause__."""

from __future__ import annotations

import pytest
from google.api_core import exceptions as gx
from google.auth import exceptions as auth_errors

from msgbus.errors import BrokerError, ConfigError, ConnectionLost, InvalidMessage, PublishError, TopologyError
from msgbus_pubsub._errors import translated


@pytest.mark.parametrize(
    ("exc", "expected", "retryable"),
    [
        (gx.NotFound("topic"), TopologyError, False),
        (gx.ServiceUnavailable("down"), ConnectionLost, True),
        (gx.DeadlineExceeded("slow"), ConnectionLost, True),
        (gx.RetryError("gave up", None), ConnectionLost, True),
        (gx.PermissionDenied("no"), BrokerError, False),
        (gx.InvalidArgument("bad"), InvalidMessage, False),
        (gx.InternalServerError("oops"), BrokerError, True),
        (auth_errors.DefaultCredentialsError("none"), ConfigError, False),
    ],
)
def test_translation(exc: Exception, expected: type[Exception], retryable: bool) -> None:
    with pytest.raises(expected) as info, translated("test"):
        raise exc
    assert info.value.__cause__ is exc
    assert getattr(info.value, "retryable") is retryable  # noqa: B009


def test_publish_failures_are_publish_errors() -> None:
    with pytest.raises(PublishError), translated("send", publish=True):
        raise gx.InternalServerError("oops")


def test_user_exceptions_pass_through() -> None:
    with pytest.raises(KeyError), translated("test"):
        raise KeyError("mine")
