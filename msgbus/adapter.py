"""The adapter interface: what a backend implements so the four roles work on it.

An adapter moves ``Record`` objects (bytes plus metadata) to and from named endpoints; the core
does everything else (codecs, retries, dead-letter policy, concurrency, shutdown). Adapters
register a factory ``(BusURL, OptionReader) -> Adapter`` under the entry-point group
``msgbus.adapters`` keyed by URL scheme; the factory reads its options from the ``OptionReader``
(unknown ones are rejected after it returns). Every method raises ``msgbus.errors`` types only
(translate in one place).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from ._capabilities import Capabilities
from ._url import BusURL

__all__ = [
    "HEADER_ATTEMPTS",
    "HEADER_DEAD_LETTER_REASON",
    "HEADER_DEAD_LETTER_SOURCE",
    "RESERVED_HEADER_PREFIX",
    "Adapter",
    "Capabilities",
    "Delivery",
    "Endpoint",
    "Receiver",
    "Record",
    "dead_letter_record",
]

RESERVED_HEADER_PREFIX = "x-msgbus-"
HEADER_DEAD_LETTER_REASON = "x-msgbus-dead-letter-reason"
HEADER_DEAD_LETTER_SOURCE = "x-msgbus-dead-letter-source"
HEADER_ATTEMPTS = "x-msgbus-attempts"


@dataclass(slots=True)
class Record:
    """A message as an adapter sees it: encoded body plus the metadata every backend carries.

    Treat it as immutable (use ``dataclasses.replace``); it is not frozen only because frozen
    dataclasses cost a noticeable share of the per-message send path.
    """

    body: bytes
    id: str
    headers: Mapping[str, str] = field(default_factory=dict)
    key: str | None = None
    correlation_id: str | None = None
    content_type: str | None = None
    timestamp: float = 0.0

    def size(self) -> int:
        """Bytes counted against a backend's message size limit (body + metadata)."""
        n = len(self.body) + len(self.id) + len(self.key or "") + len(self.correlation_id or "")
        n += len(self.content_type or "")
        for k, v in self.headers.items():
            n += len(k.encode()) + len(v.encode())
        return n


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where messages go or come from.

    ``kind="queue"``: a work queue ``name``. ``kind="topic"``: topic ``name``; to receive,
    ``subscription`` names the durable subscription. ``dead_letter=True`` addresses the
    dead-letter destination that belongs to that queue or subscription.
    """

    kind: Literal["queue", "topic"]
    name: str
    subscription: str | None = None
    dead_letter: bool = False

    def __str__(self) -> str:
        text = self.name if self.subscription is None else f"{self.name}/{self.subscription}"
        return f"{self.kind}:{text}" + (" (dead letters)" if self.dead_letter else "")


def dead_letter_record(record: Record, reason: str, attempts: int, source: Endpoint) -> Record:
    """The record to store in a dead-letter destination: original body and headers plus why."""
    headers = dict(record.headers)
    headers[HEADER_DEAD_LETTER_REASON] = reason
    headers[HEADER_ATTEMPTS] = str(attempts)
    headers[HEADER_DEAD_LETTER_SOURCE] = str(replace(source, dead_letter=False))
    return replace(record, headers=headers)


class Delivery(abc.ABC):
    """One received message and the handle that settles it. Settling twice is the core's to prevent."""

    __slots__ = ("attempt", "raw", "record")

    def __init__(self, record: Record, attempt: int, raw: object = None) -> None:
        self.record = record
        self.attempt = attempt  # 1 on first delivery
        self.raw = raw

    @abc.abstractmethod
    async def ack(self) -> None:
        """Remove the message for good."""

    @abc.abstractmethod
    async def nack(self, delay: float | None = None) -> None:
        """Make the message available again (after ``delay`` seconds where supported)."""

    @abc.abstractmethod
    async def dead_letter(self, reason: str) -> None:
        """Move the message to the dead-letter destination (``dead_letter_record``) and remove it here."""

    async def extend(self, seconds: float) -> None:  # noqa: B027 - optional hook
        """Keep the message invisible to other consumers for ``seconds`` more (lock backends)."""


class Receiver(abc.ABC):
    """Pulls deliveries from one endpoint, holding at most ``prefetch`` unsettled at a time."""

    @abc.abstractmethod
    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` seconds for at least one delivery; return up to ``max_messages``."""

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack several deliveries; adapters with a batch ack override this."""
        for d in deliveries:
            await d.ack()

    async def release(self) -> None:  # noqa: B027 - optional hook
        """Give back what was fetched but not returned by ``receive`` yet (read-ahead, credit the broker pushed),
        so other consumers get it now, not when this receiver closes or its lock expires. ``run()`` calls it
        when it stops; receiving again afterwards must work. Adapters without such a buffer need nothing."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop receiving. Unsettled deliveries are released by the broker (or by their lock expiring)."""


class Adapter(abc.ABC):
    """A connection to one backend."""

    capabilities: Capabilities
    url: BusURL
    #: Whether concurrent single sends to one endpoint should go out together (``msgbus._coalesce``): true
    #: for anything with a round trip; an in-process backend whose ``send`` never waits sets it false.
    coalesce_sends: bool = True

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect. Raises ``ConnectionLost`` when the backend cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect; idempotent."""

    @abc.abstractmethod
    async def declare(self, endpoint: Endpoint, *, create: bool = True) -> None:
        """Create the endpoint (with its dead-letter destination) if missing; idempotent.

        For a subscription endpoint this creates the topic and the subscription, after which every
        message published to the topic reaches it. With ``create=False`` (the ``topology=verify``
        option) only check that it exists, raising ``TopologyError`` when it does not.
        """

    @abc.abstractmethod
    async def send(self, endpoint: Endpoint, records: Sequence[Record], delay: float | None = None) -> None:
        """Store ``records`` at a queue or topic; return only once the backend has them durably."""

    @abc.abstractmethod
    async def receiver(self, endpoint: Endpoint, prefetch: int) -> Receiver:
        """Start receiving from a queue, a subscription, or a dead-letter destination."""
