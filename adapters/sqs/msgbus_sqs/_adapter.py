"""The SQS/SNS adapter: queues are SQS queues, topics SNS topics fanning out to one SQS queue per subscription.

Built on aiobotocore (botocore's own request signing, retries and credential chain, on asyncio), so a
long poll holds no thread. See ``docs/adapters/sqs.md`` for the mapping, limits and IAM permissions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from msgbus.adapter import (
    Adapter,
    BusURL,
    Capabilities,
    Endpoint,
    OptionReader,
    Record,
    dedup_key,
    deleted_queue,
)
from msgbus.errors import (
    CapabilityMissing,
    ClosedError,
    ConfigError,
    InvalidMessage,
    MessageTooLarge,
    PublishError,
    TopologyError,
)

from ._batch import BATCH_MAX
from ._codec import encode, sqs_size
from ._config import SQS_MAX_DELAY, SQS_MAX_MESSAGE_SIZE, SqsOptions, read_options, whole_seconds
from ._errors import is_missing, translated
from ._receiver import SqsReceiver
from ._topology import Resolved, Topology

__all__ = ["SqsAdapter", "create"]

log = logging.getLogger("msgbus.sqs")

# Record.size() counts body and metadata; the JSON around them (names, quotes, timestamp) needs room too.
METADATA_RESERVE = 1024
SQS_DEDUP_WINDOW = 300.0  # FIFO queues and topics drop a repeated MessageDeduplicationId for 5 minutes
_SEND_RETRIES = 3  # rounds for batch entries AWS failed on its side (not the sender's fault)


def create(url: BusURL, options: OptionReader) -> SqsAdapter:
    """Entry point for ``sqs://`` URLs; does no I/O."""
    return SqsAdapter(url, read_options(url, options))


def _capabilities(o: SqsOptions) -> Capabilities:
    return Capabilities(
        # FIFO: SQS hands a message group (= key) to one consumer at a time, the receiver's KeyHold keeps it one
        # at a time in that consumer. ordering=none with fifo=true keeps FIFO queues (and their dedup) unclaimed.
        ordering="per_key" if o.ordering == "per_key" else "none",
        delayed_delivery=not o.fifo,  # FIFO queues take no per-message DelaySeconds
        max_delay=SQS_MAX_DELAY,
        delayed_nack=True,  # ChangeMessageVisibility
        native_dead_letter=False,  # msgbus re-sends with the reason; the redrive policy is only a safety net
        max_message_size=SQS_MAX_MESSAGE_SIZE - METADATA_RESERVE,
        persistence="disk",
        cross_process=True,
        lock_extension=True,
        restartable=True,
        lock_duration=float(o.visibility_timeout),
        exactly_once=False,
        counts_deliveries=True,  # ApproximateReceiveCount: every receive, expired or released ones included
        native_delivery_limit=o.max_receive_count or None,  # the redrive policy's maxReceiveCount
        dedup_window=SQS_DEDUP_WINDOW if o.fifo else None,  # MessageDeduplicationId = dedup_key(record)
    )


class SqsAdapter(Adapter):
    """One SQS client and one SNS client (aiobotocore, one HTTP connection pool). Task-safe."""

    # ReceiveMessage returns at most 10 messages per call, each invisible for visibility_timeout from then on:
    # the default stays what run() needs for its workers (2 per worker) until the receiver's consume path is
    # measured at more (issue 20's SQS part).
    credit = 16

    def __init__(self, url: BusURL, options: SqsOptions) -> None:
        self.url = url
        self.options = options
        self.capabilities = _capabilities(options)
        self._stack: AsyncExitStack | None = None
        self.sqs: Any = None
        self._sns: Any = None
        self._topology: Topology | None = None
        self._receivers: set[SqsReceiver] = set()
        self._send_slots = asyncio.Semaphore(options.send_concurrency)

    def __repr__(self) -> str:
        return f"SqsAdapter({self.url.redacted!r})"

    # -- connection ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the clients and make one cheap call (ListQueues) to prove the endpoint answers."""
        if self._stack is not None:
            return
        o = self.options
        session = get_session()
        if o.profile:
            session.set_config_variable("profile", o.profile)
        config = AioConfig(
            retries={"max_attempts": o.retries + 1, "mode": "standard"},
            connect_timeout=o.connect_timeout,
            read_timeout=o.read_timeout,
            max_pool_connections=64,  # long polls hold a connection each
        )
        kwargs: dict[str, Any] = {"config": config}
        if o.region:
            kwargs["region_name"] = o.region
        if o.endpoint_url:
            kwargs["endpoint_url"] = o.endpoint_url
        if o.access_key_id:
            kwargs.update(aws_access_key_id=o.access_key_id, aws_secret_access_key=o.secret_access_key)
            if o.session_token:
                kwargs["aws_session_token"] = o.session_token
        stack = AsyncExitStack()
        try:
            with translated("connect", secrets=o.secrets):
                sqs = await stack.enter_async_context(session.create_client("sqs", **kwargs))
                sns = await stack.enter_async_context(session.create_client("sns", **kwargs))
                sts = await stack.enter_async_context(session.create_client("sts", **kwargs))
                await sqs.list_queues(QueueNamePrefix=o.prefix or "msgbus", MaxResults=1)
        except BaseException:
            await stack.aclose()
            raise
        self._stack, self.sqs = stack, sqs
        self._sns = sns
        self._topology = Topology(sqs, sns, sts, o)

    async def close(self) -> None:
        """Close every receiver (flushing pending acks), then the clients. Idempotent."""
        for receiver in list(self._receivers):
            await receiver.close()
        stack, self._stack, self._topology = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    def _topo(self) -> Topology:
        if self._topology is None:
            raise ClosedError(f"{self!r} is not open")
        return self._topology

    async def ping(self) -> None:
        """A ListQueues call of one item, as ``open`` makes."""
        self._topo()
        o = self.options
        with translated("ping", secrets=o.secrets):
            await self.sqs.list_queues(QueueNamePrefix=o.prefix or "msgbus", MaxResults=1)

    async def declare(self, endpoint: Endpoint, *, create: bool = True) -> None:
        """Create (or verify) the queue/topic/subscription of ``endpoint`` and its dead-letter queue; idempotent.

        A subscription's queue is subscribed before this returns, so it gets every message published after.
        """
        await self._topo().declare(endpoint, create=create)

    async def delete(self, endpoint: Endpoint) -> None:
        """Delete the queue and its dead-letter queue with their messages; a missing one is fine."""
        await self._topo().delete(Endpoint("queue", deleted_queue(endpoint)))

    async def resolve(self, endpoint: Endpoint) -> Resolved:
        topo = self._topo()
        found = topo.resolved(endpoint)
        return found if found is not None else await topo.declare(endpoint, create=True)

    async def stats(self, endpoint: Endpoint) -> Mapping[str, float]:
        """GetQueueAttributes of the queue it reads (ApproximateNumberOfMessages plus ...Delayed, ...NotVisible)
        and of its dead-letter queue: SQS's own figures, approximate (eventually consistent, a few seconds behind
        the sends and receives). An endpoint not declared by this adapter is looked up, never created."""
        topo = self._topo()
        found = topo.resolved(endpoint) or await topo.declare(endpoint, create=False)
        if found.queue_url is None or found.dead_letter_url is None:
            raise ConfigError(f"{endpoint} has no queue of its own: ask for a queue or a TOPIC/SUBSCRIPTION")
        names = [
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ]
        with translated(f"stats of {endpoint}", secrets=self.options.secrets):
            live = (await self.sqs.get_queue_attributes(QueueUrl=found.queue_url, AttributeNames=names))["Attributes"]
            dead = await self.sqs.get_queue_attributes(QueueUrl=found.dead_letter_url, AttributeNames=names[:1])
        return {
            "depth": int(live[names[0]]) + int(live[names[2]]),
            "in_flight": int(live[names[1]]),
            "dead_letters": int(dead["Attributes"][names[0]]),
        }

    # -- sending ------------------------------------------------------------------------------------

    async def send(self, endpoint: Endpoint, records: Sequence[Record], delay: float | None = None) -> None:
        """Send ``records`` in batches of up to 10; returns once SQS (or SNS) accepted every one of them.

        Every record is encoded and size-checked first, so an oversized one raises ``MessageTooLarge``
        before anything is sent. A send to a queue or topic that vanished re-declares it (topology=declare).
        """
        delay_seconds = None
        if delay:
            if endpoint.kind == "topic":
                raise CapabilityMissing("SNS topics cannot delay a message; send with delay to a queue instead")
            if delay > SQS_MAX_DELAY:
                raise InvalidMessage(f"delay {delay:g}s is longer than SQS's maximum {SQS_MAX_DELAY}s")
            delay_seconds = whole_seconds(delay, SQS_MAX_DELAY)
        entries = [self._entry(r, delay_seconds, topic=endpoint.kind == "topic") for r in records]
        batches = _batches(entries)
        try:
            await self._send_batches(endpoint, batches)
        except TopologyError as exc:
            if not isinstance(exc.__cause__, Exception) or not is_missing(exc.__cause__):
                raise
            stale = self._topo().resolved(endpoint)
            await self._topo().recover(endpoint, stale)
            # At-least-once: batches that went through before the loss are sent again (FIFO: deduplicated).
            await self._send_batches(endpoint, batches)

    async def _send_batches(self, endpoint: Endpoint, batches: Sequence[list[dict[str, Any]]]) -> None:
        """Send ``batches`` concurrently; raise the first failure (in send order) once all have finished.

        On FIFO a batch starts only after every earlier batch sharing a message group succeeded: concurrent
        requests reach SQS in any order, and SQS stores a group in the order its messages arrive.
        """
        sends: list[asyncio.Future[None]] = []
        last: dict[str, asyncio.Future[None]] = {}  # message group -> the latest batch holding it
        for batch in batches:
            groups = {str(e["MessageGroupId"]) for e in batch} if self.options.fifo else set()
            earlier = {last[g] for g in groups if g in last}
            send = asyncio.ensure_future(self._send_batch_after(earlier, endpoint, batch))
            last.update(dict.fromkeys(groups, send))
            sends.append(send)
        results = await asyncio.gather(*sends, return_exceptions=True)
        for result in results:  # a batch that waited fails only after an earlier one did: that one is the cause
            if isinstance(result, BaseException):
                raise result

    async def _send_batch_after(
        self, earlier: set[asyncio.Future[None]], endpoint: Endpoint, batch: list[dict[str, Any]]
    ) -> None:
        if earlier:
            await asyncio.wait(earlier)
            if any(f.cancelled() or f.exception() is not None for f in earlier):
                raise PublishError(f"not sent to {endpoint}: an earlier batch with the same keys failed")
        await self._send_batch(endpoint, batch)

    def _entry(self, record: Record, delay_seconds: int | None, *, topic: bool) -> tuple[int, dict[str, Any]]:
        record.size()  # InvalidMessage for a malformed record, before encode() trips over it
        body, attrs = encode(record)
        size = sqs_size(body, attrs)
        if size > SQS_MAX_MESSAGE_SIZE:
            raise MessageTooLarge(size, SQS_MAX_MESSAGE_SIZE)
        entry: dict[str, Any] = {"MessageAttributes": attrs, ("Message" if topic else "MessageBody"): body}
        if delay_seconds:
            entry["DelaySeconds"] = delay_seconds
        if self.options.fifo:
            entry["MessageGroupId"] = record.key if record.key else record.id
            entry["MessageDeduplicationId"] = dedup_key(record)
        return size, entry

    async def _send_batch(self, endpoint: Endpoint, batch: list[dict[str, Any]]) -> None:
        async with self._send_slots:
            where = await self.resolve(endpoint)
            pending = {str(i): entry for i, entry in enumerate(batch)}
            for _ in range(_SEND_RETRIES):
                entries = [{**e, "Id": i} for i, e in pending.items()]
                with translated(f"send to {endpoint}", publish=True, secrets=self.options.secrets):
                    if where.topic_arn is not None:
                        response = await self._sns.publish_batch(
                            TopicArn=where.topic_arn, PublishBatchRequestEntries=entries
                        )
                    else:
                        response = await self.sqs.send_message_batch(QueueUrl=where.queue_url, Entries=entries)
                failed = response.get("Failed") or []
                if not failed:
                    return
                fault = [f for f in failed if f.get("SenderFault")]
                if fault:
                    f = fault[0]
                    raise InvalidMessage(
                        f"sqs refused {len(fault)} message(s) sent to {endpoint}: {f.get('Code')}: {f.get('Message')}"
                    )
                if self.options.fifo:
                    _warn_if_reordered(endpoint, pending, {str(f["Id"]) for f in failed})
                pending = {f["Id"]: pending[f["Id"]] for f in failed}
            raise PublishError(
                f"sqs did not store {len(pending)} message(s) sent to {endpoint} after {_SEND_RETRIES} tries"
            )

    async def send_raw(self, queue_url: str, record: Record, dedup: str | None = None) -> None:
        """Send one record to a queue by URL (the dead-letter path); raises like ``send``. On FIFO ``dedup`` replaces
        the deduplication id (a dead letter put back at the end of its own dead-letter queue is no repeat)."""
        _, entry = self._entry(record, None, topic=False)
        if dedup is not None and self.options.fifo:
            entry["MessageDeduplicationId"] = dedup
        with translated("send to dead-letter queue", publish=True, secrets=self.options.secrets):
            await self.sqs.send_message(QueueUrl=queue_url, **entry)

    # -- receiving ----------------------------------------------------------------------------------

    async def receiver(self, endpoint: Endpoint, prefetch: int) -> SqsReceiver:
        """Long-poll the queue of ``endpoint`` (its dead-letter queue when ``endpoint.dead_letter``)."""
        await self.resolve(endpoint)
        receiver = SqsReceiver(self, endpoint)
        self._receivers.add(receiver)
        return receiver

    async def recover(self, endpoint: Endpoint, where: Resolved) -> None:
        """``endpoint``'s queue vanished: declare it again."""
        await self._topo().recover(endpoint, where)

    def forget(self, receiver: SqsReceiver) -> None:
        """``receiver`` closed: the adapter no longer closes it."""
        self._receivers.discard(receiver)


def _batches(entries: Sequence[tuple[int, dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Entries grouped into SQS batches: at most 10, and at most the size limit in total."""
    out: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    total = 0
    for size, entry in entries:
        if current and (len(current) == BATCH_MAX or total + size > SQS_MAX_MESSAGE_SIZE):
            out.append(current)
            current, total = [], 0
        current.append(entry)
        total += size
    if current:
        out.append(current)
    return out


def _warn_if_reordered(endpoint: Endpoint, sent: Mapping[str, Mapping[str, Any]], failed: set[str]) -> None:
    """Log when AWS stored a FIFO batch entry while failing an earlier one of its group (re-sent after it)."""
    failed_groups: set[str] = set()
    for entry_id, entry in sent.items():  # in batch order
        group = str(entry["MessageGroupId"])
        if entry_id in failed:
            failed_groups.add(group)
        elif group in failed_groups:
            log.warning(
                "msgbus: sqs failed a message of a key on its side but stored a later one; %s: the re-sent "
                "message follows it",
                endpoint,
            )
            return
