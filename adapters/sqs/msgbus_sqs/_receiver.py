"""Receiving from one SQS queue: long polls topped up to what the core asks for, and settling in batches of 10
(deletes, visibility changes). On a FIFO queue a ``KeyHold`` keeps each message group one at a time in this
consumer (SQS keeps it with one consumer at a time). The receiver holds a ``Link`` to its adapter (settings, the
client, the queue URLs and the dead-letter send), not the adapter itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from msgbus.adapter import (
    Delivery,
    Endpoint,
    KeyHold,
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
CALLS_AT_ONCE = 10  # ReceiveMessage calls one fetch makes at once (FIFO: of 1 message each; else of 10)


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

    async def send_raw(self, queue_url: str, record: Record, dedup: str | None = None) -> None: ...

    def forget(self, receiver: SqsReceiver) -> None: ...


class SqsReceiver(Receiver):
    """Long-polls one SQS queue; deletes and visibility changes go out in batches of 10."""

    def __init__(self, adapter: Link, endpoint: Endpoint) -> None:
        self._adapter = adapter
        self._o = adapter.options
        self.endpoint = endpoint
        self._closed = False
        # FIFO: a batch may hold several messages of one group (= key); the next goes out once the one before is done.
        self.hold: KeyHold[SqsDelivery] | None = KeyHold() if self._o.fifo else None
        self._deleter = Batcher(self._flush_deletes, "delete")
        self._changer = Batcher(self._flush_visibility, "change-visibility")
        self._backlog = False  # the last fetch came back full: the queue has more ready than was asked

    def __repr__(self) -> str:
        return f"SqsReceiver({self.endpoint})"

    async def _where(self) -> tuple[Resolved, str]:
        where = await self._adapter.resolve(self.endpoint)
        url = where.dead_letter_url if self.endpoint.dead_letter else where.queue_url
        assert url is not None
        return where, url

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Long-poll up to ``timeout`` seconds (whole seconds, at most ``wait_time``), then top up without waiting.

        The top-up asks for whole batches of 10, up to ``CALLS_AT_ONCE`` calls at once (never more than the
        credit asked for), and leaves a remainder under 10 for the next receive: a call costs the same for 2
        messages as for 10, and the deletes follow in the same sizes. While the queue has a backlog the long
        poll is skipped (``_fetch``). Topping up stops after a quarter of the visibility timeout, so the first
        messages are still locked when the core starts extending them.

        On a FIFO queue each call takes one message (the top-up makes up to 10 such calls at once): SQS then never
        hands this consumer a group's next message while it holds one, so a message waiting behind its key is
        never received, and its receive count (the delivery limit's count) grows only when it is handled. A call
        of 10 would take a group's next messages too, counting a receive for each every time the first came back
        (a poison message's key-mates reached the limit behind it). What is fetched still goes through the
        ``KeyHold``, the per-key hold every ordering adapter shares: a group's later message, should the endpoint
        hand one out anyway, waits in this receiver (locks extended with the first's) until the one before is
        settled, and those whose turn came are returned first, without a call.
        """
        if self._closed:
            raise ClosedError(f"{self!r} is closed")
        hold = self.hold
        if hold is not None:
            out = hold.ready(max_messages)
            if not out and len(hold) < max(BATCH_MAX, max_messages):  # else enough is read ahead: wait for a turn
                out = hold.admit(await self._fetch(max_messages, 0 if len(hold) else timeout))
            if not out and len(hold) and await hold.wait(timeout):
                out = hold.ready(max_messages)
            return [*out]
        return [*await self._fetch(max_messages, timeout)]

    async def _fetch(self, max_messages: int, timeout: float) -> list[SqsDelivery]:
        """ReceiveMessage: one long poll of up to ``timeout`` seconds, then calls without waiting to top it up.

        While the queue has a backlog (the last fetch came back full) the long poll is skipped: the first round
        is already the calls without waiting, made at once, so a consumer with a credit of 30 takes 30 in one
        round trip rather than three in a row (where each call waits for the one before, the consumer's
        handlers wait too). A round that comes back short ends the backlog; one that gets nothing falls back to
        the long poll.
        """
        wait = min(self._o.wait_time, whole_seconds(timeout, self._o.wait_time))
        where, url = await self._where()
        out: list[SqsDelivery] = []
        full = self._backlog
        if not full:
            asked = 1 if self._o.fifo else min(BATCH_MAX, max_messages)
            try:
                out = await self._receive_call(url, asked, wait)
            except TopologyError as exc:
                if not isinstance(exc.__cause__, Exception) or not is_missing(exc.__cause__):
                    raise
                log.warning("msgbus: %s vanished; declaring it again", self.endpoint)
                await self._adapter.recover(self.endpoint, where)
                return []
            full = len(out) == asked
        loop = asyncio.get_running_loop()
        top_up_until = loop.time() + self._o.visibility_timeout / 4
        while full and (sizes := self._round(max_messages - len(out))) and loop.time() < top_up_until:
            results = await asyncio.gather(*(self._receive_call(url, n, 0) for n in sizes), return_exceptions=True)
            more = [d for r in results if isinstance(r, list) for d in r]
            out.extend(more)
            full = len(more) == sum(sizes)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:  # keep what arrived; the next receive meets the error again if it lasts
                log.debug("msgbus: topping up a receive from %s failed: %s", self.endpoint, failed[0])
                full = False
        if not out and self._backlog:  # the backlog is gone (or the calls failed): wait for messages as usual
            self._backlog = False
            return await self._fetch(max_messages, timeout)
        self._backlog = full
        return out

    def _round(self, room: int) -> list[int]:
        """The sizes of one round's calls for ``room`` more messages, at most ``CALLS_AT_ONCE`` of them: FIFO calls
        of 1 (see ``receive``), otherwise whole calls of 10; a remainder under 10 waits for the next receive (a
        call costs the same for 2 messages as for 10, and the deletes follow in the same sizes)."""
        if self._o.fifo:
            return [1] * min(CALLS_AT_ONCE, room)
        return [BATCH_MAX] * min(room // BATCH_MAX, CALLS_AT_ONCE)

    async def _receive_call(self, url: str, max_messages: int, wait: int) -> list[SqsDelivery]:
        """One ReceiveMessage call."""
        with translated(f"receive from {self.endpoint}", secrets=self._o.secrets):
            response = await self._adapter.sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=max_messages,
                WaitTimeSeconds=wait,
                VisibilityTimeout=self._o.visibility_timeout,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],  # the time of foreign ones
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
        first failure once all were tried. On FIFO each goes through its own ``ack``, which moves the ``KeyHold``."""
        if self.hold is not None:
            await asyncio.gather(*(d.ack() for d in deliveries))
            return
        entries = []
        for d in deliveries:
            if not isinstance(d, SqsDelivery):
                raise TypeError(f"not an SQS delivery: {d!r}")
            entries.append({"QueueUrl": d._url, "ReceiptHandle": d._receipt})
        await self._deleter.submit_many(entries)

    async def release(self) -> None:
        """Give back what the ``KeyHold`` holds (FIFO): made visible now, so the group goes on elsewhere in order."""
        if self.hold is not None and len(self.hold):
            await give_back(self.hold.drain())

    async def close(self) -> None:
        """Stop receiving and flush pending deletes; unsettled messages return when their visibility ends."""
        if self._closed:
            return
        try:
            await self.release()
        except MsgbusError as exc:  # their visibility ends by itself
            log.debug("msgbus: giving back held messages of %s failed: %s", self.endpoint, exc)
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


async def give_back(deliveries: Sequence[SqsDelivery]) -> None:
    """Make held deliveries visible again at once (batched), in their order; raises the first failure."""
    results = await asyncio.gather(*(d.change_visibility(0) for d in deliveries), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


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
        """Delete the message (batched with concurrent acks); returns once SQS confirmed. On FIFO the next message
        of its group held here goes out only then; if the delete fails, those held go back to SQS with it."""
        hold = self._receiver.hold
        try:
            await self._receiver._deleter.submit({"QueueUrl": self._url, "ReceiptHandle": self._receipt})
        except BaseException:
            if hold is not None:
                await give_back(hold.released(self))
            raise
        if hold is not None:
            hold.settled(self)

    async def nack(self, delay: float | None = None) -> None:
        """Make it visible again now, or after ``delay`` seconds (rounded up; at most 12 hours). On FIFO the
        messages of its group held behind it are made visible now too: SQS hands the group out again from this one,
        once its delay has passed (a group waits while any of its messages is in flight)."""
        hold = self._receiver.hold
        behind = hold.released(self) if hold is not None else []
        await asyncio.gather(self.change_visibility(delay or 0.0), give_back(behind))

    async def change_visibility(self, seconds: float) -> None:
        """ChangeMessageVisibility to ``seconds`` from now (rounded up; at most 12 hours), batched; waits for SQS."""
        await self._receiver._changer.submit(
            {
                "QueueUrl": self._url,
                "ReceiptHandle": self._receipt,
                "VisibilityTimeout": whole_seconds(seconds, SQS_MAX_VISIBILITY),
            }
        )

    async def extend(self, seconds: float) -> None:
        """Keep it, and on FIFO what is held behind it, invisible ``seconds`` more from now; batched and not awaited
        (the core calls this often)."""
        hold = self._receiver.hold
        for d in [self, *(hold.behind(self) if hold is not None else ())]:
            self._receiver._changer.submit_nowait(
                {
                    "QueueUrl": d._url,
                    "ReceiptHandle": d._receipt,
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
        # Back to the end of the dead-letter queue it came from: a new message there, not a repeat of itself.
        dedup = hashlib.sha256(self._receipt.encode()).hexdigest() if receiver.endpoint.dead_letter else None
        try:
            try:
                await receiver._adapter.send_raw(dlq, record, dedup)
            except MessageTooLarge:  # the reason pushed a near-limit message over: keep its start only
                dead = dead_letter_record(self.record, reason[:200], self.attempt, source)
                await receiver._adapter.send_raw(dlq, dead, dedup)
        except BaseException:  # not moved: it comes back when its lock ends, and what is held behind it now
            if receiver.hold is not None:
                await give_back(receiver.hold.released(self))
            raise
        await self.ack()
