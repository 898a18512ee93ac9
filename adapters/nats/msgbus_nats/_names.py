"""msgbus names -> JetStream stream, consumer and subject names. Pure: no I/O.

msgbus allows ``[A-Za-z0-9][A-Za-z0-9_.-]*`` (up to 200 characters); a stream or consumer name must not
contain ``.`` and a subject token is cut at every ``.``. Each name is escaped injectively (``_`` -> ``__``,
``.`` -> ``_d``), so ``a.b``, ``a_b`` and ``a_db`` stay three different streams; the kinds are joined with
``_q_``, ``_t_``, ``_s_`` ... which no escaped name contains. A stream name longer than JetStream's 255
characters keeps a readable head and a SHA-256 of the whole (again with a separator no escaped name has).
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

from msgbus.adapter import Endpoint

MAX_NAME = 200  # below JetStream's 255-character limit on stream and consumer names (they are directory names)
QUEUE_CONSUMER = "msgbus"  # the one durable consumer of a queue or dead-letter stream
MAX_DELIVERIES = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


def escape(name: str) -> str:
    """``name`` with ``_`` and ``.`` escaped: a valid stream name and subject token, injective."""
    return name.replace("_", "__").replace(".", "_d")


def _bounded(name: str) -> str:
    if len(name) <= MAX_NAME:
        return name
    return f"{name[:120]}_h{hashlib.sha256(name.encode()).hexdigest()[:40]}"


@dataclass(frozen=True, slots=True)
class Route:
    """Where an endpoint lives on the server.

    ``stream`` holds the messages (``subject`` is where they are sent); ``consumer`` is the durable pull
    consumer a receiver reads (``None`` for a topic endpoint without a subscription, which only sends).
    ``dead_stream``/``dead_subject`` hold the endpoint's dead letters; ``source_stream``/``source_consumer``
    name what a dead-letter endpoint's messages came from (for the max_deliver backstop). With
    ``ordering=per_key`` (``partitions`` > 0) keyed messages go to ``<subject>.p<i>`` instead, each read by its own
    durable consumer ``<consumer>_p<i>`` (an escaped name never has a lone ``_``, so these never collide).
    """

    endpoint: Endpoint
    stream: str
    subject: str
    consumer: str | None
    dead_stream: str
    dead_subject: str
    source_stream: str
    source_consumer: str | None
    partitions: int = 0

    @property
    def ordered(self) -> bool:
        """Whether keyed messages go to partitions (``partitions`` counts the source's, for a dead-letter route)."""
        return self.partitions > 0 and not self.endpoint.dead_letter

    @property
    def consumers(self) -> list[tuple[str, str | None]]:
        """(durable consumer, filter subject) of each consumer a receiver reads: the endpoint's own, then its
        partitions'. Unpartitioned, the one consumer takes the whole stream (no filter, as it always had)."""
        if self.consumer is None:
            return []
        if not self.ordered:
            return [(self.consumer, None)]
        parts = [(f"{self.consumer}_p{i}", f"{self.subject}.p{i}") for i in range(self.partitions)]
        return [(self.consumer, self.subject), *parts]

    @property
    def subjects(self) -> list[str]:
        """The stream's subjects: the endpoint's, and its partitions' under ``ordering=per_key``."""
        return [self.subject, f"{self.subject}.*"] if self.ordered else [self.subject]

    @property
    def advisory_subjects(self) -> list[str]:
        """Where the server announces messages of this endpoint's consumers that reached max_deliver."""
        names = [self.source_consumer] if self.source_consumer else []
        names += [f"{self.source_consumer}_p{i}" for i in range(self.partitions)] if self.source_consumer else []
        return [f"{MAX_DELIVERIES}.{self.source_stream}.{name}" for name in names]

    def partition_subject(self, key: str) -> str:
        """Where a message with ``key`` goes: the partition its key hashes to (crc32, as the RabbitMQ adapter)."""
        return f"{self.subject}.p{zlib.crc32(key.encode()) % self.partitions}"


def route(prefix: str, endpoint: Endpoint, partitions: int = 0) -> Route:
    """The streams, subjects and consumers of ``endpoint`` under ``prefix`` (letters, digits, ``-``), with
    ``partitions`` partition subjects and consumers for keyed messages (0: none; never for a dead-letter one)."""
    name = escape(endpoint.name)
    consumer: str | None
    if endpoint.kind == "queue":
        stream, subject, consumer = f"{prefix}_q_{name}", f"{prefix}.q.{name}", QUEUE_CONSUMER
        dead = f"{prefix}_dq_{name}", f"{prefix}.dq.{name}"
    else:
        stream, subject = f"{prefix}_t_{name}", f"{prefix}.t.{name}"
        sub = None if endpoint.subscription is None else escape(endpoint.subscription)
        consumer = None if sub is None else _bounded(sub)
        dead = f"{prefix}_dt_{name}_s_{sub}", f"{prefix}.dt.{name}.{sub}"
    source_stream, dead_stream = _bounded(stream), _bounded(dead[0])
    if endpoint.dead_letter:
        return Route(
            endpoint, dead_stream, dead[1], QUEUE_CONSUMER, dead_stream, dead[1], source_stream, consumer, partitions
        )
    return Route(endpoint, source_stream, subject, consumer, dead_stream, dead[1], source_stream, consumer, partitions)
