"""Coalesce per-message SQS calls (delete, change visibility) into batch calls of up to 10 entries.

The core settles messages one at a time from many handler tasks; SQS charges per request and takes 10
entries per batch request. A ``Batcher`` collects what is submitted in the same moment (and while a
batch is in flight), so N concurrent acks cost about N/10 requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from msgbus.errors import ClosedError, MsgbusError

log = logging.getLogger("msgbus.sqs")

BATCH_MAX = 10  # entries per SQS batch request

# Sends one batch (entries carry their "Id"), returns {Id: error} for the entries that failed.
Flush = Callable[[list[dict[str, Any]]], Awaitable[Mapping[str, MsgbusError]]]


class Batcher:
    """Collects entries and sends them in batches of ``BATCH_MAX``; one flushing task at a time."""

    def __init__(self, flush: Flush, what: str) -> None:
        self._flush = flush
        self._what = what
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None] | None]] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(self, entry: dict[str, Any]) -> None:
        """Add ``entry`` to the next batch and wait until AWS accepted it; raises its ``msgbus`` error."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._add(entry, future)
        await future

    async def submit_many(self, entries: Sequence[dict[str, Any]]) -> None:
        """``submit`` for several entries at once: waits until AWS answered for each of them, then raises the
        first failure (the others were sent all the same)."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[None]] = []
        for entry in entries:  # futures, not a task per entry (what a gather of submit() calls would cost)
            futures.append(loop.create_future())
            self._add(entry, futures[-1])
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def submit_nowait(self, entry: dict[str, Any]) -> None:
        """Add ``entry`` to the next batch without waiting; a failure is only logged (best effort)."""
        self._add(entry, None)

    def _add(self, entry: dict[str, Any], future: asyncio.Future[None] | None) -> None:
        if self._closed:
            raise ClosedError(f"{self._what}: receiver is closed")
        self._pending.append((entry, future))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"msgbus-sqs-{self._what}")

    async def _run(self) -> None:
        try:
            await asyncio.sleep(0)  # let callers in the same loop iteration join this batch
            while self._pending:
                taken, self._pending = self._pending, []
                chunks = [taken[i : i + BATCH_MAX] for i in range(0, len(taken), BATCH_MAX)]
                await asyncio.gather(*(self._send(chunk) for chunk in chunks))
        finally:
            self._task = None

    async def _send(self, chunk: Sequence[tuple[dict[str, Any], asyncio.Future[None] | None]]) -> None:
        entries = [{**entry, "Id": str(i)} for i, (entry, _) in enumerate(chunk)]
        try:
            failed = await self._flush(entries)
        except MsgbusError as exc:
            failed = {str(i): exc for i in range(len(chunk))}
        for i, (_, future) in enumerate(chunk):
            err = failed.get(str(i))
            if future is None:
                if err is not None:
                    log.debug("msgbus: sqs %s failed (best effort): %s", self._what, err)
            elif not future.done():
                if err is None:
                    future.set_result(None)
                else:
                    future.set_exception(err)

    async def close(self) -> None:
        """Send what is pending, then refuse new entries."""
        self._closed = True
        task = self._task
        if task is not None:
            await asyncio.wait([task])  # never raises: each entry's error went to its own future
