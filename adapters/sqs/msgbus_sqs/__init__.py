"""msgbus backend for AWS SQS and SNS (``sqs://REGION?endpoint_url=...`` URLs).

Queues are SQS queues; topics are SNS topics fanning out to one SQS queue per subscription.
"""

from ._adapter import SqsAdapter, create
from ._receiver import ReceivedMessage, SqsDelivery, SqsReceiver

__all__ = ["ReceivedMessage", "SqsAdapter", "SqsDelivery", "SqsReceiver", "create"]
