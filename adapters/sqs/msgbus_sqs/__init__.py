"""msgbus backend for AWS SQS and SNS (``sqs://REGION?endpoint_url=...`` URLs).

Queues are SQS queues; topics are SNS topics fanning out to one SQS queue per subscription.
"""

from ._adapter import ReceivedMessage, SqsAdapter, SqsDelivery, SqsReceiver, create

__all__ = ["ReceivedMessage", "SqsAdapter", "SqsDelivery", "SqsReceiver", "create"]
