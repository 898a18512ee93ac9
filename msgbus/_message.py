"""Messages: ``Outgoing`` (what to send) and ``Message`` (what was received, with its settlement)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from .adapter import HEADER_ATTEMPTS, HEADER_DEAD_LETTER_REASON, Delivery, dead_letter_reason
from .errors import InvalidMessage

T = TypeVar("T")


class Settling(Protocol):
    """What a received message tells, once, when it is settled: the consumer's inbox (``_inbox``), which counts
    the messages held unsettled against prefetch and remembers the nacked ones (their redelivery is expected)."""

    def settled(self, msg: Message[Any], *, nacked: bool = False) -> None: ...

    #: Sends a reply to a received request (``Message.reply``): ``(request, body, headers)``.
    reply: Callable[[Message[Any], object, Mapping[str, str] | None], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to send with its own options, for ``send_many`` / ``publish_many``."""

    body: Any
    key: str | None = None
    headers: Mapping[str, str] | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    content_type: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)


class Message(Generic[T]):
    """A received message. Settle it once with ``ack``, ``nack`` or ``reject``; repeats do nothing.

    ``body`` is decoded (bytes, str, a JSON value, or the consumer's ``model``); ``payload`` is the raw bytes.
    Not task-safe for concurrent settlement from two tasks at once (the first one wins).
    """

    __slots__ = ("_delivery", "_inbox", "body", "settled")

    def __init__(self, delivery: Delivery, body: T, inbox: Settling | None) -> None:
        self._delivery = delivery
        self._inbox = inbox
        self.body: T = body
        self.settled = False

    # Metadata, straight from the delivered record.
    @property
    def payload(self) -> bytes:
        return self._delivery.record.body

    @property
    def headers(self) -> Mapping[str, str]:
        return self._delivery.record.headers

    @property
    def key(self) -> str | None:
        return self._delivery.record.key

    @property
    def id(self) -> str:
        return self._delivery.record.id

    @property
    def correlation_id(self) -> str | None:
        return self._delivery.record.correlation_id

    @property
    def content_type(self) -> str | None:
        return self._delivery.record.content_type

    @property
    def timestamp(self) -> float:
        """When the sender created it, in seconds since the epoch."""
        return self._delivery.record.timestamp

    @property
    def created_at(self) -> datetime:
        return datetime.fromtimestamp(self._delivery.record.timestamp, UTC)

    @property
    def attempt(self) -> int:
        """1 on first delivery, then +1 per redelivery."""
        return self._delivery.attempt

    @property
    def raw(self) -> object:
        """The backend's own message object (escape hatch; not portable)."""
        return self._delivery.raw

    @property
    def dead_letter_reason(self) -> str | None:
        """Why it was dead-lettered (messages read from ``bus.dead_letters(...)``)."""
        return self._delivery.record.headers.get(HEADER_DEAD_LETTER_REASON)

    @property
    def dead_letter_attempts(self) -> int | None:
        value = self._delivery.record.headers.get(HEADER_ATTEMPTS)
        return int(value) if value and value.isdigit() else None

    async def ack(self) -> None:
        """Remove the message for good."""
        if self._settle():
            await self._delivery.ack()

    async def nack(self, delay: float | None = None) -> None:
        """Make the message available again, after ``delay`` seconds where the backend supports it.

        ``delay`` is a finite number of seconds >= 0 (else ``InvalidMessage``, and the message stays unsettled).
        """
        if delay is not None and not (isinstance(delay, int | float) and not isinstance(delay, bool)):
            raise InvalidMessage(f"nack delay must be a number of seconds or None, not {type(delay).__name__}")
        if delay is not None and not 0 <= delay < 1e15:  # NaN and infinity too: infinity would park it for good
            raise InvalidMessage(f"nack delay must be a finite number of seconds >= 0, got {delay!r:.40}")
        if self._settle(nacked=True):
            await self._delivery.nack(None if delay is None else float(delay))

    async def reject(self, reason: str) -> None:
        """Dead-letter the message with ``reason`` (cut to ``MAX_DEAD_LETTER_REASON`` characters); it is not
        redelivered here."""
        if not isinstance(reason, str):
            raise InvalidMessage(f"reject reason must be a str, not {type(reason).__name__}")
        if self._settle():
            await self._delivery.dead_letter(dead_letter_reason(reason))

    async def reply(self, body: object, *, headers: Mapping[str, str] | None = None) -> None:
        """Answer this request (sent with ``bus.request()``): send ``body`` to the requester's reply queue, with this
        message's id as correlation id. Returns once the reply is stored durably; call it before the message is
        settled (under ``run()``: reply, then return, which acks), so a crash in between re-delivers the request
        and the requester drops the second reply. ``InvalidMessage`` when the message carries no reply-to (it
        was sent, not requested), names no valid queue, or is settled already; under ``run()`` that is a
        handler failure like any other: retried, then dead-lettered with the reason.
        """
        if self.settled:
            raise InvalidMessage(f"message {self.id!r:.80} is settled: reply before ack, so a crash cannot lose it")
        if self._inbox is None:
            raise InvalidMessage(f"message {self.id!r:.80} was not received by a consumer: there is nothing to reply")
        await self._inbox.reply(self, body, headers)

    def _settle(self, *, nacked: bool = False) -> bool:
        if self.settled:
            return False
        self.settled = True
        if self._inbox is not None:
            self._inbox.settled(self, nacked=nacked)
        return True

    def __repr__(self) -> str:
        return f"<Message id={self.id!r} attempt={self.attempt} key={self.key!r} settled={self.settled}>"
