"""The one place nats-py exceptions become ``msgbus.errors`` (the original stays on ``__cause__``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import nats.errors as nx
import nats.js.errors as jx

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

# JetStream API error codes (``err_code``) that say the topology does not match.
_TOPOLOGY_CODES = {
    10058,  # stream name already in use with a different configuration
    10065,  # subjects overlap with an existing stream
    10148,  # consumer already exists with a different configuration
    10013,  # consumer name already in use
}

# Most specific first; the first matching row wins. The last column is ``retryable`` on the raised error.
_TABLE: tuple[tuple[type[BaseException], type[MsgbusError], bool], ...] = (
    (jx.NotFoundError, TopologyError, False),  # stream or consumer missing (deleted, or topology=verify)
    (jx.NoStreamResponseError, PublishError, True),  # no stream took the subject (yet: JetStream recovering)
    (jx.ServiceUnavailableError, BrokerError, True),  # JetStream not ready (after a restart) or not enabled
    (jx.BadRequestError, BrokerError, False),  # the request itself is wrong; trying again cannot help
    (jx.APIError, BrokerError, True),
    (nx.AuthorizationError, ConfigError, False),  # wrong credentials: fix the URL
    (nx.MaxPayloadError, InvalidMessage, False),
    (nx.BadSubjectError, InvalidMessage, False),
    (nx.BadHeaderError, InvalidMessage, False),
    (nx.SecureConnRequiredError, ConfigError, False),  # the server wants TLS: tls=true
    (nx.SecureConnWantedError, ConfigError, False),
    (nx.NoRespondersError, PublishError, True),
    (nx.NoServersError, ConnectionLost, True),
    (nx.OutboundBufferLimitError, ConnectionLost, True),  # disconnected, and the reconnect buffer is full
    (nx.ConnectionClosedError, ConnectionLost, True),
    (nx.StaleConnectionError, ConnectionLost, True),
    (nx.TimeoutError, ConnectionLost, True),  # no answer in time (the connection may be half-open)
    (TimeoutError, ConnectionLost, True),
    (OSError, ConnectionLost, True),
    (nx.Error, BrokerError, True),
)


def convert(
    exc: BaseException, doing: str, secrets: Sequence[str | None] = (), *, publish: bool = False
) -> MsgbusError:
    """The msgbus error for ``exc`` (unknown exceptions become ``BrokerError``), with secrets removed.

    ``publish`` marks a send: a broker-side refusal there is a ``PublishError``.
    """
    kind: type[MsgbusError] = BrokerError
    retryable = True
    for source, target, can_retry in _TABLE:
        if isinstance(exc, source):
            kind, retryable = target, can_retry
            break
    if isinstance(exc, jx.APIError) and exc.err_code in _TOPOLOGY_CODES:
        kind, retryable = TopologyError, False
    elif publish and kind is BrokerError:
        kind = PublishError
    detail = redact(str(exc) or type(exc).__name__, list(secrets))
    err = kind(f"NATS: {doing} failed: {type(exc).__name__}: {detail}")
    if err.retryable != retryable:
        err.retryable = retryable
    return err


@contextmanager
def translate(doing: str, secrets: Sequence[str | None] = (), *, publish: bool = False) -> Iterator[None]:
    """Re-raise nats-py (and socket) errors raised inside the block as msgbus errors saying what failed."""
    try:
        yield
    except MsgbusError:
        raise
    except (nx.Error, OSError, TimeoutError) as exc:
        raise convert(exc, doing, secrets, publish=publish) from exc
