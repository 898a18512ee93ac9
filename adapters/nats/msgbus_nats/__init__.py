"""msgbus backend for NATS JetStream (``nats://`` URLs).

Queues and topics are streams; a queue's consumers and each subscription read one durable pull consumer.
"""

from ._adapter import NatsAdapter, create
from ._receiver import NatsDelivery, NatsReceiver

__all__ = ["NatsAdapter", "NatsDelivery", "NatsReceiver", "create"]
