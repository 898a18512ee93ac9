"""Create or verify the SQS queues, SNS topics and subscriptions behind msgbus endpoints.

A work queue is an SQS queue with a redrive policy to its dead-letter queue. A subscription is an SQS
queue (with its own dead-letter queue) subscribed to the SNS topic with raw message delivery, so the body
and message attributes arrive as published, plus a queue policy that lets that topic send to it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from msgbus.adapter import Endpoint
from msgbus.errors import TopologyError

from ._config import SqsOptions
from ._errors import error_code, translated
from ._names import names_for

_RETENTION_MAX = "1209600"  # dead letters are kept as long as SQS allows: 14 days


@dataclass(frozen=True, slots=True)
class Resolved:
    """Where one endpoint lives on AWS: the queue a receiver reads, its dead-letter queue, the topic."""

    queue_url: str | None
    dead_letter_url: str | None
    topic_arn: str | None


class Topology:
    """Declares endpoints once per adapter and remembers their URLs and ARNs. Task-safe."""

    def __init__(self, sqs: Any, sns: Any, sts: Any, options: SqsOptions) -> None:
        self._sqs = sqs
        self._sns = sns
        self._sts = sts
        self._o = options
        self._resolved: dict[Endpoint, Resolved] = {}
        self._create: dict[Endpoint, bool] = {}
        self._arns: dict[str, str] = {}
        self._lock = asyncio.Lock()

    @staticmethod
    def base(endpoint: Endpoint) -> Endpoint:
        """The endpoint without its dead-letter flag: both share one declaration."""
        return Endpoint(endpoint.kind, endpoint.name, endpoint.subscription)

    def resolved(self, endpoint: Endpoint) -> Resolved | None:
        """What ``declare`` found for ``endpoint`` (None before it ran)."""
        return self._resolved.get(self.base(endpoint))

    async def declare(self, endpoint: Endpoint, *, create: bool) -> Resolved:
        """Create (or with ``create=False`` only look up) the AWS resources of ``endpoint``; idempotent."""
        base = self.base(endpoint)
        self._create[base] = create
        found = self._resolved.get(base)
        if found is None:
            with translated(f"declare {base}", secrets=self._o.secrets):
                found = await (self._create_all(base) if create else self._verify(base))
            self._resolved[base] = found
        return found

    async def recover(self, endpoint: Endpoint, stale: Resolved | None) -> Resolved:
        """The endpoint vanished (deleted, or the endpoint lost its state): declare it again.

        Only when it was declared with ``topology=declare``; in verify mode a missing endpoint stays a
        ``TopologyError``. Concurrent callers share one re-declaration.
        """
        base = self.base(endpoint)
        if not self._create.get(base, False):
            raise TopologyError(f"{base} no longer exists (topology=verify: not re-creating it)")
        async with self._lock:
            current = self._resolved.get(base)
            if current is not None and current is not stale:
                return current  # someone else re-declared it meanwhile
            self._resolved.pop(base, None)
            self._arns.clear()
            return await self.declare(base, create=True)

    async def delete(self, endpoint: Endpoint) -> None:
        """Delete queue ``endpoint``'s SQS queue and its dead-letter queue (a missing one is fine), and forget them."""
        n = names_for(endpoint, self._o.prefix, fifo=self._o.fifo)
        self._resolved.pop(endpoint, None)
        self._create.pop(endpoint, None)
        with translated(f"delete {endpoint}", secrets=self._o.secrets):
            for name in (n.queue, n.dead_letter_queue):
                try:
                    url = str((await self._sqs.get_queue_url(QueueName=name))["QueueUrl"])
                except Exception as exc:
                    if error_code(exc) in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                        continue
                    raise
                self._arns.pop(url, None)
                await self._sqs.delete_queue(QueueUrl=url)

    # -- create ------------------------------------------------------------------------------------

    async def _create_all(self, endpoint: Endpoint) -> Resolved:
        n = names_for(endpoint, self._o.prefix, fifo=self._o.fifo)
        topic_arn = await self._create_topic(n.topic) if n.topic is not None else None
        if n.queue is None or n.dead_letter_queue is None:
            return Resolved(None, None, topic_arn)
        dlq_url = await self._create_queue(n.dead_letter_queue, {"MessageRetentionPeriod": _RETENTION_MAX})
        attrs = {"VisibilityTimeout": str(self._o.visibility_timeout)}
        if self._o.retention_period is not None:
            attrs["MessageRetentionPeriod"] = str(self._o.retention_period)
        if self._o.max_receive_count:
            # The safety net for poison messages that crash consumers before msgbus can dead-letter them.
            policy = {
                "deadLetterTargetArn": await self._queue_arn(dlq_url),
                "maxReceiveCount": self._o.max_receive_count,
            }
            attrs["RedrivePolicy"] = json.dumps(policy)
        queue_url = await self._create_queue(n.queue, attrs)
        if topic_arn is not None:
            await self._subscribe(topic_arn, queue_url)
        return Resolved(queue_url, dlq_url, topic_arn)

    async def _create_queue(self, name: str, attrs: dict[str, str]) -> str:
        if self._o.fifo:
            attrs = {**attrs, "FifoQueue": "true", "ContentBasedDeduplication": "false"}
        try:
            response = await self._sqs.create_queue(QueueName=name, Attributes=attrs)
            return str(response["QueueUrl"])
        except Exception as exc:
            if error_code(exc) not in ("QueueAlreadyExists", "QueueNameExists"):
                raise
        # It exists with other attributes (an older msgbus config, or made by hand): bring ours up to date.
        url = str((await self._sqs.get_queue_url(QueueName=name))["QueueUrl"])
        mutable = {k: v for k, v in attrs.items() if k != "FifoQueue"}
        await self._sqs.set_queue_attributes(QueueUrl=url, Attributes=mutable)
        return url

    async def _create_topic(self, name: str) -> str:
        attrs = {"FifoTopic": "true", "ContentBasedDeduplication": "false"} if self._o.fifo else {}
        response = await self._sns.create_topic(Name=name, Attributes=attrs)
        return str(response["TopicArn"])

    async def _subscribe(self, topic_arn: str, queue_url: str) -> None:
        queue_arn = await self._queue_arn(queue_url)
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "msgbus-sns-to-sqs",
                    "Effect": "Allow",
                    "Principal": {"Service": "sns.amazonaws.com"},
                    "Action": "sqs:SendMessage",
                    "Resource": queue_arn,
                    "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
                }
            ],
        }
        await self._sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"Policy": json.dumps(policy)})
        await self._sns.subscribe(
            TopicArn=topic_arn,
            Protocol="sqs",
            Endpoint=queue_arn,
            Attributes={"RawMessageDelivery": "true"},
            ReturnSubscriptionArn=True,
        )

    async def _queue_arn(self, url: str) -> str:
        arn = self._arns.get(url)
        if arn is None:
            response = await self._sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
            arn = self._arns[url] = str(response["Attributes"]["QueueArn"])
        return arn

    # -- verify ------------------------------------------------------------------------------------

    async def _verify(self, endpoint: Endpoint) -> Resolved:
        n = names_for(endpoint, self._o.prefix, fifo=self._o.fifo)
        topic_arn = None
        if n.topic is not None:
            topic_arn = await self._topic_arn(n.topic)
            try:
                await self._sns.get_topic_attributes(TopicArn=topic_arn)
            except Exception as exc:
                if error_code(exc) in ("NotFound", "NotFoundException"):
                    raise TopologyError(f"{endpoint} does not exist (topology=verify): no SNS topic {n.topic}") from exc
                raise
        if n.queue is None or n.dead_letter_queue is None:
            return Resolved(None, None, topic_arn)
        urls = []
        for name in (n.queue, n.dead_letter_queue):
            try:
                urls.append(str((await self._sqs.get_queue_url(QueueName=name))["QueueUrl"]))
            except Exception as exc:
                if error_code(exc) in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                    raise TopologyError(f"{endpoint} does not exist (topology=verify): no SQS queue {name}") from exc
                raise
        return Resolved(urls[0], urls[1], topic_arn)

    async def _topic_arn(self, name: str) -> str:
        """The ARN of topic ``name`` in this account and region, without creating it."""
        identity = await self._sts.get_caller_identity()
        account = str(identity["Account"])
        partition = str(identity["Arn"]).split(":")[1]
        region = self._sns.meta.region_name
        return f"arn:{partition}:sns:{region}:{account}:{name}"
