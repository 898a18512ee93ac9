"""Send coalescing: concurrent single sends to one endpoint share adapter calls.

While a send to an endpoint is waiting for the backend, further single sends to it queue up, and the queue
goes out as one batch (one round trip, the adapter's native batch) as soon as that send returns. A sender
that finds the endpoint idle yields once, so that the senders ready at that moment join it; alone, it sends
its record itself: a lone ``await send()`` costs one loop iteration more, not a round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from .adapter import Record
from .errors import InvalidMessage, MessageTooLarge

_Entry = tuple[Record, "asyncio.Future[None]"]
SendFn = Callable[[Sequence[Record]], Awaitable[None]]

# Errors about one record, raised by an adapter before it stored anything: a batch that fails with one of
# these is split, so each caller gets its own record's outcome instead of a neighbour's.
_PER_RECORD = (InvalidMessage, MessageTooLarge)


class Coalescer:
    """Batches concurrent single sends to one endpoint (see the module docstring)."""

    def __init__(self, send: SendFn, max_batch: int = 500) -> None:
        self._send = send
        self._max_batch = max_batch
        self._busy = False  # a send to the backend is in flight
        self._waiting: list[_Entry] = []
        self._gathering: list[_Entry] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(self, record: Record) -> None:
        """Store ``record``; returns once the backend has it (raises its own error when it did not)."""
        if self._gathering is not None and len(self._gathering) < self._max_batch - 1:  # a batch is forming: join
            await self._wait(self._gathering, record)
            return
        if self._busy or self._waiting:  # the backend is busy: queue for the next batch
            await self._wait(self._waiting, record)
            return
        # Lead a batch: yield once so that the senders that are ready to run now can join it.
        self._busy = True
        batch = self._gathering = []
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            self._gathering = None
            self._waiting[:0] = batch
            self._busy = False
            self._flush()
            raise
        self._gathering = None
        batch = _live(batch)
        if not batch:  # alone: send it from this task, no task of its own needed
            try:
                await self._send((record,))
            finally:
                self._busy = False
                self._flush()
            return
        # Others joined: send in a task of its own, so that no caller's cancellation cuts the others' short.
        entry: _Entry = (record, asyncio.get_running_loop().create_future())
        batch.insert(0, entry)
        self._start(batch)
        await entry[1]

    async def _wait(self, queue: list[_Entry], record: Record) -> None:
        # A caller cancelled here leaves its entry behind, its future cancelled: batches are taken without
        # such entries (``_live``), so it is never sent unless its batch already went to the backend.
        entry: _Entry = (record, asyncio.get_running_loop().create_future())
        queue.append(entry)
        await entry[1]

    def _start(self, batch: list[_Entry]) -> None:
        task = asyncio.get_running_loop().create_task(self._send_batch(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _flush(self) -> None:
        """Hand the waiting records to the adapter as one batch, in a task of its own so that no caller's
        cancellation can cut short the others' send."""
        while self._waiting and not self._busy:
            batch = _live(self._waiting[: self._max_batch])
            del self._waiting[: self._max_batch]
            if batch:
                self._busy = True
                self._start(batch)

    async def _send_batch(self, batch: list[_Entry]) -> None:
        try:
            await self._settle(batch)
        finally:
            self._busy = False
            self._flush()

    async def _settle(self, batch: list[_Entry]) -> None:
        try:
            await self._send([record for record, _ in batch])
        except _PER_RECORD as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            for entry in batch:  # nothing was stored: each caller learns its own record's outcome
                await self._settle([entry])
        except Exception as exc:  # the backend's outcome for the whole batch is every caller's outcome
            _fail(batch, exc)
        except BaseException:  # cancelled: the loop is going away
            for _, done in batch:
                done.cancel()
            raise
        else:
            for _, done in batch:
                if not done.done():
                    done.set_result(None)


def _live(entries: list[_Entry]) -> list[_Entry]:
    """The entries whose callers are still waiting (a cancelled caller's future is done)."""
    return [entry for entry in entries if not entry[1].done()]


def _fail(batch: list[_Entry], exc: Exception) -> None:
    for _, done in batch:
        if not done.done():
            done.set_exception(exc)
