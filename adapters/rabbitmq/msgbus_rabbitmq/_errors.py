"""The one place where aio-pika / aiormq (sends) and pika (receivers) exceptions become ``msgbus.errors``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import aiormq.exceptions as amqp
import pika.exceptions as pika
from aio_pika.exceptions import DeliveryError

from msgbus.adapter import redact
from msgbus.errors import BrokerError, ConnectionLost, MsgbusError, PublishError, TopologyError

# Most specific first; the first matching row wins. ``False`` in the last column marks errors that
# trying again cannot fix (retryable=False on the raised instance).
_TABLE: tuple[tuple[type[BaseException], type[MsgbusError], bool], ...] = (
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
    (pika.ChannelClosed, ConnectionLost, True),  # by the client, or by the broker with a code not below
    (pika.ChannelWrongStateError, ConnectionLost, True),
    (amqp.ChannelInvalidStateError, ConnectionLost, True),  # channel/connection closed under us
    (ConnectionError, ConnectionLost, True),
    (TimeoutError, ConnectionLost, True),
    (OSError, ConnectionLost, True),
    (amqp.AMQPError, BrokerError, True),
    (pika.AMQPError, BrokerError, True),
)

# pika closes a channel with one exception type; the broker's reply code says what went wrong.
_CLOSE_CODES: dict[int, tuple[type[MsgbusError], bool]] = {
    404: (TopologyError, False),  # queue/exchange missing
    406: (TopologyError, False),  # declared with other arguments
    403: (BrokerError, False),  # no permission
}


@contextmanager
def translate(doing: str, secrets: Sequence[str | None] = ()) -> Iterator[None]:
    """Re-raise client-library errors raised inside the block as msgbus errors saying what failed."""
    try:
        yield
    except MsgbusError:
        raise
    except Exception as exc:
        raise convert(exc, doing, secrets) from exc


def convert(exc: BaseException, doing: str, secrets: Sequence[str | None] = ()) -> MsgbusError:
    """The msgbus error for ``exc`` (unknown exceptions become ``BrokerError``), with secrets removed."""
    kind: type[MsgbusError] = BrokerError
    retryable = True
    for source, target, can_retry in _TABLE:
        if isinstance(exc, source):
            kind, retryable = target, can_retry
            break
    if isinstance(exc, pika.ChannelClosedByBroker) and exc.reply_code in _CLOSE_CODES:
        kind, retryable = _CLOSE_CODES[exc.reply_code]
    detail = redact(str(exc) or type(exc).__name__, list(secrets))
    err = kind(f"RabbitMQ: {doing} failed: {type(exc).__name__}: {detail}")
    if err.retryable != retryable:
        err.retryable = retryable
    return err
