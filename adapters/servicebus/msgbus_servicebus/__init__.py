"""msgbus backend for Azure Service Bus (``servicebus://KeyName:Key@host`` URLs, or a connection string).

Queues are queues, topics are topics and each msgbus subscription is a Service Bus subscription;
messages are peek-locked, dead letters go to the native ``$DeadLetterQueue`` sub-queue.
"""

from ._adapter import ServiceBusAdapter, create
from ._config import url_from_connection_string
from ._receiver import ServiceBusDelivery, ServiceBusReceiverAdapter

__all__ = [
    "ServiceBusAdapter",
    "ServiceBusDelivery",
    "ServiceBusReceiverAdapter",
    "create",
    "url_from_connection_string",
]
