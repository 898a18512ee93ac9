"""nats-py exceptions -> ``msgbus.errors``: the table; ``msgbus.adapter.ErrorTable`` applies it (its docstring
has the rules, a failed send's included)."""

from __future__ import annotations

import nats.errors as nx
import nats.js.errors as jx

from msgbus.adapter import ErrorRow, ErrorTable
from msgbus.errors import BrokerError, ConfigError, ConnectionLost, InvalidMessage, PublishError, TopologyError

# JetStream API error codes (``err_code``) that say the topology does not match.
_TOPOLOGY_CODES = {
    10058,  # stream name already in use with a different configuration
    10065,  # subjects overlap with an existing stream
    10148,  # consumer already exists with a different configuration
    10013,  # consumer name already in use
}


def _topology_mismatch(exc: BaseException) -> bool:
    return isinstance(exc, jx.APIError) and exc.err_code in _TOPOLOGY_CODES


# Most specific first; the first matching row wins. The last column is ``retryable`` on the raised error.
ERRORS = ErrorTable(
    "NATS",
    [
        ErrorRow(_topology_mismatch, TopologyError, False),
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
    ],
)
convert = ERRORS.convert
translated = ERRORS.translated
