"""Dead-letter redrive's records: what a dead letter looks like when it goes back (``Bus.redrive`` moves them).

``Bus.redrive`` is built on the kit every adapter already has (a dead-letter receiver, ``send``, ``ack``), so every
backend gets it: each batch is sent back first and its dead letters are acked only once that send returned, so a
crash in between leaves them in both places (a duplicate), never in neither. A redriven message keeps its id, key,
body and headers; its attempt count starts again (it is a new send), and why it died moves into
``x-msgbus-dead-letter-history``. A subscription's dead letters go back through the topic, marked for that
subscription alone: the consumers of the topic's other subscriptions ack and skip them (``for_other_subscription``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ._message import Message
from .adapter import (
    HEADER_ATTEMPTS,
    HEADER_DEAD_LETTER_HISTORY,
    HEADER_DEAD_LETTER_REASON,
    HEADER_DEAD_LETTER_SOURCE,
    Endpoint,
    Record,
)

HEADER_REDRIVE_SUBSCRIPTION = "x-msgbus-redrive-subscription"
MAX_HISTORY = 5  # deaths remembered per message (each reason is at most 1024 characters)
BATCH = 100  # dead letters read, sent back and acked per round
HOLD = 1000  # dead letters a redrive may leave in place (filtered out, dry run) before it stops looking

Filter = Callable[[Message[Any]], bool]
Progress = Callable[[int, int], None]  # (moved, looked at) so far


@dataclass(slots=True)
class Redriven:
    """What a redrive did: ``moved`` went back to their source; ``left`` stayed dead (filtered out, dry run)."""

    moved: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)


def redriven_record(record: Record, subscription: str | None) -> Record:
    """``record`` as it goes back: the dead-letter headers folded into the history, a fresh attempt count."""
    headers = dict(record.headers)
    reason = headers.pop(HEADER_DEAD_LETTER_REASON, None)
    attempts = headers.pop(HEADER_ATTEMPTS, None)
    source = headers.pop(HEADER_DEAD_LETTER_SOURCE, None)
    headers.pop(HEADER_REDRIVE_SUBSCRIPTION, None)
    history = history_of(headers.pop(HEADER_DEAD_LETTER_HISTORY, None))
    history.append({"reason": reason, "attempts": attempts, "source": source})
    # ASCII JSON: every backend's headers can hold it, whatever the reasons say.
    headers[HEADER_DEAD_LETTER_HISTORY] = json.dumps(history[-MAX_HISTORY:], separators=(",", ":"))
    if subscription is not None:
        headers[HEADER_REDRIVE_SUBSCRIPTION] = subscription
    return replace(record, headers=headers)


def history_of(text: str | None) -> list[dict[str, Any]]:
    """The deaths recorded in a history header (oldest first); ``[]`` for none or a damaged one."""
    try:
        value = json.loads(text) if text else []
    except ValueError:
        return []
    return [entry for entry in value if isinstance(entry, dict)] if isinstance(value, list) else []


def for_other_subscription(record: Record, endpoint: Endpoint) -> bool:
    """Whether ``record`` is a redriven dead letter of another subscription of ``endpoint``'s topic."""
    try:
        target = record.headers.get(HEADER_REDRIVE_SUBSCRIPTION)
    except AttributeError:  # damaged metadata: decoding dead-letters it
        return False
    return target is not None and target != endpoint.subscription
