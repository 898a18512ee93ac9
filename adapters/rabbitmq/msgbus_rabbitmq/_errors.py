"""aio-pika / aiormq (sends) and pika (receivers) exceptions -> ``msgbus.errors``: the table;
``msgbus.adapter.ErrorTable`` applies it (its docstring has the rules)."""

from __future__ import annotations

from collections.abc import Callable

import aiormq.exceptions as amqp
import pika.exceptions as pika
from aio_pika.exceptions import DeliveryError

from msgbus.adapter import ErrorRow, ErrorTable
from msgbus.errors import BrokerError, ConnectionLost, PublishError, TopologyError


def _closed_by_broker(*codes: int) -> Callable[[BaseException], bool]:
    """pika closes a channel with one exception type; the broker's reply code says what went wrong."""
    return lambda exc: isinstance(exc, pika.ChannelClosedByBroker) and exc.reply_code in codes


# Most specific first; the first matching row wins. ``False`` in the last column marks errors that
# trying again cannot fix (retryable=False on the raised instance).
ERRORS = ErrorTable(
    "RabbitMQ",
    [
        ErrorRow(_closed_by_broker(404, 406), TopologyError, False),  # queue/exchange missing, or other arguments
        ErrorRow(_closed_by_broker(403), BrokerError, False),  # no permission
        (amqp.ChannelNotFoundEntity, TopologyError, False),  # 404: queue/exchange missing
        (amqp.ChannelPreconditionFailed, TopologyError, False),  # 406: declared with other arguments
        (amqp.ChannelAccessRefused, BrokerError, False),  # 403: no permission on the vhost/resource
        (amqp.PublishError, PublishError, True),  # basic.return: mandatory message could not be routed
        (DeliveryError, PublishError, True),  # basic.nack from the broker: not stored
        (amqp.AuthenticationError, BrokerError, False),
        (amqp.ProbableAuthenticationError, BrokerError, False),
        (amqp.ConnectionNotAllowed, BrokerError, False),  # e.g. unknown vhost
        (pika.ProbableAuthenticationError, BrokerError, False),
        (pika.AuthenticationError, BrokerError, False),
        (pika.ProbableAccessDeniedError, BrokerError, False),  # e.g. unknown vhost
        (amqp.AMQPConnectionError, ConnectionLost, True),
        (pika.AMQPConnectionError, ConnectionLost, True),
        (pika.ChannelClosed, ConnectionLost, True),  # by the client, or by the broker with a code not above
        (pika.ChannelWrongStateError, ConnectionLost, True),
        (amqp.ChannelInvalidStateError, ConnectionLost, True),  # channel/connection closed under us
        (ConnectionError, ConnectionLost, True),
        (TimeoutError, ConnectionLost, True),
        (OSError, ConnectionLost, True),
        (amqp.AMQPError, BrokerError, True),
        (pika.AMQPError, BrokerError, True),
        (Exception, BrokerError, True),  # anything else the clients raise in a translated block
    ],
)
convert = ERRORS.convert
translated = ERRORS.translated
