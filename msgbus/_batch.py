"""Batch handlers (``Consumer.run_batch``): what a handler of a list of messages returns, and how it is told apart.

The consume loop is ``_runtime.run``'s, shared with ``run()``: a ``Batch`` in place of a handler makes its workers
gather messages into lists. Only the outcome of one batch is decided here (``failures``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ._message import Message

MAX_BATCH = 10_000  # messages in one batch: more is a typo, and a prefetch of that many per worker


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What a batch handler returns for a partial failure: the messages that failed, each with its exception.

    Those go through the retry policy one by one, as if their handler had raised that exception (a nack with
    backoff, dead-lettered with it as the reason once their attempts run out); the rest of the batch is acked.
    Messages the handler settled itself (``ack``, ``nack``, ``reject``) stay as it settled them.
    """

    failed: Mapping[Message[Any], BaseException] = field(default_factory=dict)


#: A batch handler: gets up to ``max_batch`` messages; returns ``None`` (ack all) or a ``BatchResult``.
BatchHandler = Callable[[list[Message[Any]]], Awaitable[BatchResult | None]]
BatchMiddleware = Callable[[BatchHandler], BatchHandler]


class Batch(NamedTuple):
    """``run_batch``'s handler and sizes, handed to ``_runtime.run`` in place of a per-message handler."""

    handler: BatchHandler
    max_batch: int
    max_wait: float


def failures(result: object, msgs: Sequence[Message[Any]]) -> Mapping[Message[Any], BaseException]:
    """The failed messages ``result`` names; ``TypeError`` (a failure of the whole batch) when it is malformed."""
    if result is None:
        return {}
    if not isinstance(result, BatchResult):
        raise TypeError(f"a batch handler returns None or a msgbus.BatchResult, not {type(result).__name__}")
    batch = set(msgs)
    for msg, exc in result.failed.items():
        if msg not in batch:
            raise TypeError(f"BatchResult.failed names {msg!r:.120}, which is not in this batch")
        if not isinstance(exc, BaseException):
            raise TypeError(f"BatchResult.failed maps {msg.id!r:.80} to a {type(exc).__name__}, not an exception")
    return result.failed
