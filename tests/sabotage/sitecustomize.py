"""Breaks one promise of msgbus inside a worker process that the contract suite starts.

Python imports ``sitecustomize`` at start-up from ``sys.path``: the mutation tests in
``tests/test_contract_sqlite.py`` put this directory on the worker's ``PYTHONPATH`` and name the breakage
in ``MSGBUS_TEST_SABOTAGE``. The checks run in the test process, unbroken; only the consumer is.
"""

from __future__ import annotations

import os
from typing import Any


def _sqlite_ignores_expired_leases() -> None:
    """A lease that expired unsettled is not counted: a message that killed its consumer stays at attempt 1."""
    from msgbus import _sqlite

    _sqlite._LEASE = _sqlite._LEASE.replace("attempts = attempts + 1", "attempts = attempts + (lease IS NULL)")


def _redeliveries_in_arrival_order() -> None:
    """Suspects run in the order they arrived, so those held behind a poison never run before it."""
    from msgbus._redelivery import Redeliveries

    choose = Redeliveries._choose

    async def first_come(self: Redeliveries, first: Any) -> Any:
        pick = await choose(self, first)
        if pick is not None and pick is not first and first.attempt <= self.max_attempts:
            self.inbox.buffer.remove(first)
            self.inbox.buffer.appendleft(pick)
            return first
        return pick

    Redeliveries._choose = first_come  # type: ignore[method-assign]


def _acks_wait_for_the_buffer() -> None:
    """The runtime never makes a handler that does not await send its acks: they go when the buffer is empty."""
    from msgbus._inbox import Inbox

    Inbox.acks_overdue = lambda self, batch, delay: False  # type: ignore[method-assign]


def _sqlite_acks_on_next_receive() -> None:
    """The sqlite receiver keeps acks until its next receive call (one round trip fewer, a crash loses them)."""
    from msgbus import _sqlite

    receiver = _sqlite._SqliteReceiver
    receive, ack_many = receiver.receive, receiver.ack_many
    kept: dict[int, list[Any]] = {}

    async def keep(self: Any, deliveries: Any) -> None:
        kept.setdefault(id(self), []).extend(deliveries)

    async def flush_then_receive(self: Any, max_messages: int, timeout: float) -> Any:
        if kept.get(id(self)):
            await ack_many(self, kept.pop(id(self)))
        return await receive(self, max_messages, timeout)

    receiver.ack_many = keep  # type: ignore[method-assign]
    receiver.receive = flush_then_receive  # type: ignore[method-assign]


BREAKAGES = {
    "sqlite-ignores-expired-leases": _sqlite_ignores_expired_leases,
    "redeliveries-in-arrival-order": _redeliveries_in_arrival_order,
    "acks-wait-for-the-buffer": _acks_wait_for_the_buffer,
    "sqlite-acks-on-next-receive": _sqlite_acks_on_next_receive,
}

_name = os.environ.get("MSGBUS_TEST_SABOTAGE")
if _name:
    BREAKAGES[_name]()
