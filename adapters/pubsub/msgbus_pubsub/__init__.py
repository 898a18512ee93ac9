"""msgbus backend for Google Cloud Pub/Sub (``pubsub://PROJECT`` URLs).

Topics are topics, each subscription is a subscription, and a queue is a topic with one shared
subscription. See ``docs/adapters/pubsub.md``.
"""

from ._adapter import PubSubAdapter, create
from ._receiver import PubSubDelivery, PubSubReceiver

__all__ = ["PubSubAdapter", "PubSubDelivery", "PubSubReceiver", "create"]
