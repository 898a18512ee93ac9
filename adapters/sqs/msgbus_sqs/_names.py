"""msgbus endpoint -> SQS queue and SNS topic names. Pure: unit-tested without AWS.

SQS queue names are 1-80 characters of ``[A-Za-z0-9_-]`` (``.fifo`` included); SNS topic names 1-256.
msgbus names also allow ``.`` and run to 200 characters, so a name that does not fit as is becomes its
sanitised head plus a hash of the full name: distinct msgbus names never share an AWS name.

- queue ``q``                         -> SQS queue ``{prefix}q``, dead letters ``{prefix}q--dlq``
- topic ``t``                         -> SNS topic ``{prefix}t``
- subscription ``s`` of topic ``t``   -> SQS queue ``{prefix}t--s``, dead letters ``{prefix}t--s--dlq``
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from msgbus.adapter import Endpoint

SEPARATOR = "--"
DLQ_SUFFIX = "--dlq"
FIFO_SUFFIX = ".fifo"
_QUEUE_MAX = 80
_TOPIC_MAX = 256
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, slots=True)
class Names:
    """The AWS resources behind one endpoint: where receives come from and (for topics) where sends go."""

    queue: str | None  # the SQS queue a receiver reads (None for a topic's sending side)
    dead_letter_queue: str | None  # its dead-letter queue
    topic: str | None  # the SNS topic (None for a work queue)


def _fit(name: str, limit: int) -> str:
    """``name`` itself when it is AWS-safe and short enough, else a sanitised head plus an 8-byte hash."""
    if len(name) <= limit and not _UNSAFE.search(name):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    head = _UNSAFE.sub("_", name)[: limit - len(digest) - 1]
    return f"{head}-{digest}"


def queue_name(prefix: str, base: str, *, dead_letter: bool, fifo: bool) -> str:
    """The SQS queue name for ``base`` (a queue, or ``topic--subscription``)."""
    room = _QUEUE_MAX - (len(FIFO_SUFFIX) if fifo else 0) - len(DLQ_SUFFIX)
    name = _fit(prefix + base, room)
    if dead_letter:
        name += DLQ_SUFFIX
    return name + (FIFO_SUFFIX if fifo else "")


def topic_name(prefix: str, topic: str, *, fifo: bool) -> str:
    """The SNS topic name for msgbus topic ``topic``."""
    room = _TOPIC_MAX - (len(FIFO_SUFFIX) if fifo else 0)
    return _fit(prefix + topic, room) + (FIFO_SUFFIX if fifo else "")


def names_for(endpoint: Endpoint, prefix: str, *, fifo: bool) -> Names:
    """The queue, dead-letter queue and topic behind ``endpoint`` (its ``dead_letter`` flag is ignored)."""
    if endpoint.kind == "queue":
        base = endpoint.name
        topic = None
    else:
        topic = topic_name(prefix, endpoint.name, fifo=fifo)
        if endpoint.subscription is None:
            return Names(None, None, topic)
        base = endpoint.name + SEPARATOR + endpoint.subscription
    return Names(
        queue_name(prefix, base, dead_letter=False, fifo=fifo),
        queue_name(prefix, base, dead_letter=True, fifo=fifo),
        topic,
    )
