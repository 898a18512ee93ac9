"""msgbus backend for Apache Kafka (``kafka://`` and ``kafka+ssl://`` URLs), on aiokafka.

Queues and topics are Kafka topics; each queue and each subscription is a consumer group.
"""

from ._adapter import KafkaAdapter, create
from ._receiver import KafkaDelivery, KafkaReceiver

__all__ = ["KafkaAdapter", "KafkaDelivery", "KafkaReceiver", "create"]
