"""Redelivered messages in ``run()``: the delivery limit, and running redeliveries one at a time.

``attempt`` counts deliveries, including those to consumers that died or stopped before settling. A message
delivered more than ``max_attempts`` times is dead-lettered before any handler sees it: it may be what
killed the consumers that held it.

A redelivery that this consumer did not nack itself (a *suspect*: it came back because a consumer died or
stopped while holding it) runs alone: no other handler runs, the acks of everything handled before are in,
and its own ack is in before anything else starts (each wait bounded by ``ALONE`` seconds, so a long handler
never stalls the run). If it kills the process, what comes back is only itself
and what was merely held (prefetched) with it. Those held messages count a delivery too, so which suspect
runs next alternates with the attempt count: the oldest (by send time) when the highest attempt among the
held suspects is even, the newest when it is odd. A message that kills its consumer splits the others held
with it into older and newer ones; each group runs before it in one of two consecutive rounds, so with
``max_attempts >= 3`` they are handled before they can reach the limit (docs/guide.md, "Delivery limit").
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ._inbox import REMEMBERED, Inbox
from ._message import Message
from ._waits import wait_set
from .errors import MsgbusError

log = logging.getLogger("msgbus")

ALONE = 1.0  # seconds a suspect waits for handlers in flight, and then runs with no other starting
TOP_UP = 0.05  # seconds to wait for more held redeliveries before choosing which one runs


def limit_reason(attempt: int, max_attempts: int) -> str:
    """The dead-letter reason of a message over the delivery limit."""
    return (
        f"delivered {attempt} times without being settled (max_attempts={max_attempts}): the consumer "
        "stopped or died while holding it"
    )


async def dead_letter_over_limit(msg: Message[Any], max_attempts: int, inbox: Inbox[Any]) -> None:
    """Dead-letter ``msg`` (delivered more than ``max_attempts`` times, received by ``inbox``) without handling
    it; observed like a handled message when telemetry is on (``Telemetry.unhandled``)."""
    reason = limit_reason(msg.attempt, max_attempts)
    log.warning("msgbus: message %s dead-lettered before handling: %s", msg.id, reason)
    telemetry = inbox.telemetry
    try:
        if telemetry is None:
            await msg.reject(reason)
        else:
            record = msg._delivery.record
            await telemetry.unhandled(inbox.endpoint, record, msg.attempt, reason, msg.reject(reason))
    except MsgbusError as err:
        log.warning("msgbus: could not dead-letter message %s over the delivery limit: %s", msg.id, err)


class Redeliveries:
    """The turn-taking of one ``run()``: suspects one at a time, alone; other messages wait while one runs.

    Workers count themselves in ``running`` around a handler of a message that is not a suspect.
    """

    def __init__(self, inbox: Inbox[Any], max_attempts: int) -> None:
        self.inbox = inbox
        self.max_attempts = max_attempts
        self.held = False  # a suspect runs alone: other handlers must not start
        self.running = 0
        self._lock = asyncio.Lock()
        self._turn = asyncio.Event()
        self._turn.set()
        self._quiet: asyncio.Event | None = None  # set by the last handler to finish while a suspect waits
        self._seen: set[str] = set()  # suspects already considered (the buffer was topped up for them)
        self._owner: Message[Any] | None = None  # the suspect running alone
        self._timer: asyncio.TimerHandle | None = None

    def suspect(self, msg: Message[Any]) -> bool:
        """Whether redelivery ``msg`` came back without this consumer having nacked it (``Inbox.nacked``)."""
        return self.inbox.nacked.get(msg.id) != msg.attempt - 1

    async def wait(self) -> None:
        """Wait while a suspect runs alone."""
        while self.held:
            await self._turn.wait()

    def done(self) -> None:
        """A handler counted in ``running`` finished."""
        self.running -= 1
        if not self.running and self._quiet is not None:
            self._quiet.set()

    async def enter(self, first: Message[Any]) -> Message[Any] | None:
        """Take the turn for suspect ``first``: returns the suspect to run alone now (maybe another one held),
        or None when there is none left to run (others ran them, or they were over the limit). The caller
        runs it, then calls ``leave(it)``.

        Bounded both ways, so a long handler never stalls the run: the turn waits at most ``ALONE`` seconds
        for handlers in flight, and is given up after ``ALONE`` seconds even if the suspect still runs.
        """
        self.inbox.buffer.appendleft(first)  # whoever chooses next must see it, not only this worker
        await self._lock.acquire()
        self.held = True
        self._turn.clear()
        try:
            if self.running:
                self._quiet = asyncio.Event()
                await wait_set(self._quiet, ALONE)
                self._quiet = None
            await self.inbox.acks_durable()
            chosen = await self._choose()
        except BaseException:
            self._release()
            raise
        if chosen is None:
            self._release()
            return None
        self._owner = chosen
        self._timer = asyncio.get_running_loop().call_later(ALONE, self.leave, chosen)
        return chosen

    def leave(self, msg: Message[Any]) -> None:
        """The suspect ``msg`` finished (or ran ``ALONE`` seconds): others may run. Idempotent."""
        if self._owner is msg:
            self._release()

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._owner = None
        if self.held:
            self.held = False
            self._turn.set()
            self._lock.release()

    async def _choose(self) -> Message[Any] | None:
        inbox = self.inbox
        buffer = inbox.buffer

        def held() -> list[Message[Any]]:
            return [m for m in buffer if m._delivery.attempt > 1 and self.suspect(m)]

        # Hold every redelivery the backend has ready before choosing: for new ones, wait a moment for the
        # rest of what came back with them; later, take what is ready (the buffer refills as they run).
        await inbox.top_up(TOP_UP if any(m.id not in self._seen for m in held()) else 0.0)
        candidates = held()
        if not candidates:
            return None
        taken = {id(m) for m in candidates}
        kept = [m for m in buffer if id(m) not in taken]
        buffer.clear()
        buffer.extend(kept)
        if len(self._seen) >= REMEMBERED:
            self._seen.clear()
        self._seen.update(m.id for m in candidates)
        for m in [m for m in candidates if m.attempt > self.max_attempts]:
            candidates.remove(m)
            await dead_letter_over_limit(m, self.max_attempts, inbox)
        if not candidates:
            return None
        newest = max(m.attempt for m in candidates) % 2 == 1
        pick = (max if newest else min)(candidates, key=lambda m: (m.timestamp, m.id))
        buffer.extendleft(reversed([m for m in candidates if m is not pick]))  # back in front, in held order
        return pick
