"""msgbus endpoints -> RabbitMQ queue names, and the holding queues of delayed messages. Pure: no I/O."""

from __future__ import annotations

import hashlib
import math
import re
import zlib

from msgbus.adapter import Endpoint, Record
from msgbus.errors import ConfigError

MAX_NAME = 255  # bytes in an AMQP queue or exchange name
QUEUE_NAME = re.compile(r"[A-Za-z0-9_.:@#,/+ -]+")  # what the client (pamqp) lets through as a queue name


def queue_name(endpoint: Endpoint) -> str:
    """The RabbitMQ queue that holds ``endpoint``'s messages (a queue, a subscription, or dead letters)."""
    if endpoint.kind == "queue":
        base = endpoint.name
    elif endpoint.subscription is not None:
        base = f"{endpoint.name}.{endpoint.subscription}"
    else:
        raise ConfigError(f"{endpoint}: receiving from a topic needs a subscription name")
    return f"{base}.dlq" if endpoint.dead_letter else base


def partition_queues(name: str, partitions: int) -> list[str]:
    """The partition queues of queue ``name`` under ``ordering=per_key``: ``name.p0`` ... ``name.p<N-1>``."""
    return [f"{name}.p{i}" for i in range(partitions)]


def partition_of(record: Record, partitions: int) -> int:
    """The partition of keyed ``record``: by its key, so every message of a key is in one queue."""
    return zlib.crc32((record.key or "").encode()) % partitions


def delay_bucket_ms(delay: float) -> int:
    """``delay`` in whole milliseconds, rounded up to two significant digits.

    Every distinct delay needs its own holding queue (a queue has one TTL), so jittered backoffs are
    grouped: a message waits at least ``delay`` and at most about 10 % longer.
    """
    ms = max(1, math.ceil(delay * 1000))
    if ms < 100:
        return ms
    scale = 10 ** (len(str(ms)) - 2)
    return int(-(-ms // scale) * scale)


def holding_queue_name(ms: int, target: str, kind: str) -> str:
    """Name of the holding queue for ``ms`` milliseconds towards queue/exchange ``target``."""
    name = f"msgbus.delay.{ms}ms.{kind}.{target}"
    if len(name.encode()) <= MAX_NAME:
        return name
    digest = hashlib.sha256(target.encode()).hexdigest()[:16]
    return f"msgbus.delay.{ms}ms.{kind}.{digest}"
