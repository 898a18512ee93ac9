"""aiokafka exceptions -> ``msgbus.errors``: the table; ``msgbus.adapter.ErrorTable`` applies it (its docstring
has the rules, a failed send's included)."""

from __future__ import annotations

from aiokafka import errors as kx

from msgbus.adapter import ErrorTable
from msgbus.errors import BrokerError, ConfigError, ConnectionLost, InvalidMessage, TopologyError

# Most specific first; the first matching row wins. ``retryable`` None keeps the class default.
ERRORS = ErrorTable(
    "Kafka",
    [
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
        (TimeoutError, ConnectionLost, None),
        (OSError, ConnectionLost, None),
        (kx.KafkaError, BrokerError, None),
    ],
)
convert = ERRORS.convert
translated = ERRORS.translated
