"""Receiving from one SQS queue: long polls topped up to what the core asks for, and settling in batches of 10
(deletes, visibility changes). The receiver holds a ``Link`` to its adapter (settings, the client, the queue
URLs and the dead-letter send), not the adapter itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from msgbus.adapter import (
    Delivery,
    Endpoint,
    Receiver,
    Record,
    dead_letter_record,
)
from msgbus.errors import (
    BrokerError,
    ClosedError,
    DecodeError,
    MessageTooLarge,
    MsgbusError,
    TopologyError,
)

from ._batch import BATCH_MAX, Batcher
from ._codec import decode
from ._config import SQS_MAX_VISIBILITY, SqsOptions, whole_seconds
from ._errors import is_missing, translated
from ._topology import Resolved, Topology

log = logging.getLogger("msgbus.sqs")


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """``Delivery.raw`` on this backend: the queue it came from and the message as SQS returned it."""

    queue_url: str
    message: Mapping[str, Any]


class Link(Protocol):
    """What a receiver needs from its adapter: the settings, the SQS client, queue URLs, and the dead-letter send."""

    options: SqsOptions
    sqs: Any  # the aiobotocore SQS client while open

    async def resolve(self, endpoint: Endpoint) -> Resolved: ...

    async def recover(self, endpoint: Endpoint, where: Resolved) -> None: ...

    async def send_raw(self, queue_url: str, record: Record) -> None: ...

    def forget(self, receiver: SqsReceiver) -> None: ...


class SqsReceiver(Receiver):
    """Long-polls one SQS queue; deletes and visibility changes go out in batches of 10."""

    def __init__(self, adapter: Link, endpoint: Endpoint) -> None:
        self._adapter = adapter
        self._o = adapter.options
        self.endpoint = endpoint
        self._closed = False
        self._deleter = Batcher(self._flush_deletes, "delete")
        self._changer = Batcher(self._flush_visibility, "change-visibility")

    def __repr__(self) -> str:
        return f"SqsReceiver({self.endpoint})"

    async def _where(self) -> tuple[Resolved, str]:
        where = await self._adapter.resolve(self.endpoint)
        url = where.dead_letter_url if self.endpoint.dead_letter else where.queue_url
        assert url is not None
        return where, url

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Long-poll up to ``timeout`` seconds (whole seconds, at most ``wait_time``), then top up without waiting.

        The top-up asks for whole batches of 10, one call at a time (a receiver must not crowd out the
        endpoint's other clients), and leaves a remainder under 10 for the next receive: a call costs the same
        for 2 messages as for 10, and the deletes follow in the same sizes. On a FIFO queue each call takes one
        message, so a batch never holds two of one message group (SQS hands out the next of a group only after
        the previous one is deleted or visible again); the top-up makes up to 10 such calls at once. Topping up
        stops after a quarter of the visibility timeout, so the first messages are still locked when the core
        starts extending them.
        """
        if self._closed:
            raise ClosedError(f"{self!r} is closed")
        wait = min(self._o.wait_time, whole_seconds(timeout, self._o.wait_time))
        where, url = await self._where()
        asked = 1 if self._o.fifo else min(BATCH_MAX, max_messages)
        try:
            out = await self._receive_call(url, asked, wait)
        except TopologyError as exc:
            if not isinstance(exc.__cause__, Exception) or not is_missing(exc.__cause__):
                raise
            log.warning("msgbus: %s vanished; declaring it again", self.endpoint)
            await self._adapter.recover(self.endpoint, where)
            return []
        loop = asyncio.get_running_loop()
        top_up_until = loop.time() + self._o.visibility_timeout / 4
        got = len(out)
        while got == asked and len(out) < max_messages and loop.time() < top_up_until:
            room = max_messages - len(out)
            if room < BATCH_MAX and not self._o.fifo:
                break  # the remainder waits for the next receive: a call costs the same for 2 as for 10
            asked = min(BATCH_MAX, room)
            sizes = [1] * asked if self._o.fifo else [asked]
            results = await asyncio.gather(*(self._receive_call(url, n, 0) for n in sizes), return_exceptions=True)
            more = [d for r in results if isinstance(r, list) for d in r]
            out.extend(more)
            got = len(more)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:  # keep what arrived; the next receive meets the error again if it lasts
                log.debug("msgbus: topping up a receive from %s failed: %s", self.endpoint, failed[0])
                break
        return out

    async def _receive_call(self, url: str, max_messages: int, wait: int) -> list[Delivery]:
        """One ReceiveMessage call."""
        with translated(f"receive from {self.endpoint}", secrets=self._o.secrets):
            response = await self._adapter.sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=max_messages,
                WaitTimeSeconds=wait,
                VisibilityTimeout=self._o.visibility_timeout,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
        return [self._delivery(url, m) for m in response.get("Messages") or []]

    def _delivery(self, url: str, message: Mapping[str, Any]) -> SqsDelivery:
        attempt = int((message.get("Attributes") or {}).get("ApproximateReceiveCount", "1"))
        problem = None
        try:
            record = decode(message)
        except DecodeError as exc:  # a broken "msgbus" attribute: handed on with its problem, the core dead-letters it
            problem = str(exc)
            record = Record(body=str(message.get("Body", "")).encode(), id=str(message.get("MessageId", "")))
        raw = ReceivedMessage(url, message)
        return SqsDelivery(record, attempt, raw, self, str(message["ReceiptHandle"]), problem)

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Delete several messages in batches of 10 (one future per batch, not a task per message); raises the
        first failure once all were tried."""
        entries = []
        for d in deliveries:
            if not isinstance(d, SqsDelivery):
                raise TypeError(f"not an SQS delivery: {d!r}")
            entries.append({"QueueUrl": d._url, "ReceiptHandle": d._receipt})
        await self._deleter.submit_many(entries)

    async def close(self) -> None:
        """Stop receiving and flush pending deletes; unsettled messages return when their visibility ends."""
        if self._closed:
            return
        self._closed = True
        await self._deleter.close()
        await self._changer.close()
        self._adapter.forget(self)

    async def _flush_deletes(self, entries: list[dict[str, Any]]) -> Mapping[str, MsgbusError]:
        url = entries[0]["QueueUrl"]
        batch = [{"Id": e["Id"], "ReceiptHandle": e["ReceiptHandle"]} for e in entries]
        with translated(f"ack on {self.endpoint}", secrets=self._o.secrets):
            response = await self._adapter.sqs.delete_message_batch(QueueUrl=url, Entries=batch)
        return _failures(response, f"ack on {self.endpoint}")

    async def _flush_visibility(self, entries: list[dict[str, Any]]) -> Mapping[str, MsgbusError]:
        url = entries[0]["QueueUrl"]
        batch = [
            {"Id": e["Id"], "ReceiptHandle": e["ReceiptHandle"], "VisibilityTimeout": e["VisibilityTimeout"]}
            for e in entries
        ]
        with translated(f"change visibility on {self.endpoint}", secrets=self._o.secrets):
            response = await self._adapter.sqs.change_message_visibility_batch(QueueUrl=url, Entries=batch)
        return _failures(response, f"change visibility on {self.endpoint}")


def _failures(response: Mapping[str, Any], action: str) -> dict[str, MsgbusError]:
    """The failed entries of a batch response as ``msgbus`` errors, by entry Id."""
    out: dict[str, MsgbusError] = {}
    for f in response.get("Failed") or []:
        err = BrokerError(f"sqs {action} failed: {f.get('Code')}: {f.get('Message')}")
        err.retryable = not f.get("SenderFault", False)  # a stale receipt handle will not get better
        out[str(f["Id"])] = err
    return out


class SqsDelivery(Delivery):
    """One received SQS message and its receipt handle."""

    __slots__ = ("_receipt", "_receiver")

    def __init__(
        self,
        record: Record,
        attempt: int,
        raw: ReceivedMessage,
        receiver: SqsReceiver,
        receipt: str,
        problem: str | None = None,
    ) -> None:
        super().__init__(record, attempt, raw, problem)
        self._receiver = receiver
        self._receipt = receipt

    @property
    def _url(self) -> str:
        assert isinstance(self.raw, ReceivedMessage)
        return self.raw.queue_url

    async def ack(self) -> None:
        """Delete the message (batched with concurrent acks); returns once SQS confirmed."""
        await self._receiver._deleter.submit({"QueueUrl": self._url, "ReceiptHandle": self._receipt})

    async def nack(self, delay: float | None = None) -> None:
        """Make it visible again now, or after ``delay`` seconds (rounded up; at most 12 hours)."""
        seconds = whole_seconds(delay or 0.0, SQS_MAX_VISIBILITY)
        await self._receiver._changer.submit(
            {"QueueUrl": self._url, "ReceiptHandle": self._receipt, "VisibilityTimeout": seconds}
        )

    async def extend(self, seconds: float) -> None:
        """Keep it invisible ``seconds`` more from now; batched and not awaited (the core calls this often)."""
        self._receiver._changer.submit_nowait(
            {
                "QueueUrl": self._url,
                "ReceiptHandle": self._receipt,
                "VisibilityTimeout": whole_seconds(seconds, SQS_MAX_VISIBILITY),
            }
        )

    async def dead_letter(self, reason: str) -> None:
        """Send it to the dead-letter queue with the reason headers, then delete it here.

        A dead letter read from a dead-letter queue goes back to the end of that same queue.
        """
        receiver = self._receiver
        where, _ = await receiver._where()
        dlq = where.dead_letter_url
        assert dlq is not None
        source = Topology.base(receiver.endpoint)
        record = dead_letter_record(self.record, reason, self.attempt, source)
        try:
            await receiver._adapter.send_raw(dlq, record)
        except MessageTooLarge:  # the reason pushed a near-limit message over: keep its start only
            await receiver._adapter.send_raw(dlq, dead_letter_record(self.record, reason[:200], self.attempt, source))
        await self.ack()
