"""msgbus backend for Redis Streams (``redis://`` and ``rediss://`` URLs).

Queues and topics are streams, each subscription (and each queue) is a consumer group.
"""

from ._adapter import RedisAdapter, create
from ._receiver import RedisDelivery, RedisReceiver, StreamEntry

__all__ = ["RedisAdapter", "RedisDelivery", "RedisReceiver", "StreamEntry", "create"]
